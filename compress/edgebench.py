"""Edge latency report: ONNX files × runtimes × threads × batch sizes × input sizes.

Each cell is one :func:`compress.bench.measure`: a fresh process pinned to the given CPU cores
(standing in for a small edge CPU), so its memory figures are its own: the session's load time,
p50/p90/p99 latency, throughput and peak resident memory. Runtimes: onnxruntime's CPU provider and,
when the ``openvino`` package is installed, OpenVINO reading the same ONNX file; a runtime that is
absent is reported as such, and a cell whose measurement fails carries the one-line reason."""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
from pathlib import Path

from compress import bench
from compress.bench import RUNTIMES
from compress.errors import CompressError

log = logging.getLogger(__name__)

CELL_TIMEOUT_S = 600.0


def runtime_status(name: str) -> dict:
    if name not in RUNTIMES:
        raise CompressError(f"unknown runtime {name!r}; valid: {', '.join(RUNTIMES)}")
    if importlib.util.find_spec(name) is None:
        return {"available": False, "reason": f"{name} is not installed (pip install '{'compress[openvino]' if name == 'openvino' else name}')"}
    try:
        mod = __import__(name)
    except Exception as e:  # noqa: BLE001 - a broken install is reported, not raised
        return {"available": False, "reason": f"{name} does not import: {e}"}
    version = getattr(mod, "__version__", None) or getattr(getattr(mod, "runtime", None), "get_version", lambda: "?")()
    return {"available": True, "version": str(version)}


def machine() -> dict:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "system": platform.platform(), "python": platform.python_version()}


def bench_files(files: list[Path], runtimes: list[str], threads: list[int], batches: list[int],
                sizes: list[int] | None, cores: list[int] | None, warmup: int, runs: int,
                labels: list[str] | None = None) -> dict:
    for f in files:
        if not Path(f).is_file():
            raise CompressError(f"ONNX file not found: {f}")
    ncpu = os.cpu_count() or 1
    for t in threads:
        if t < 1 or t > ncpu:
            raise CompressError(f"--threads {t}: must be between 1 and this machine's {ncpu} cores")
    if cores is not None and any(c < 0 or c >= ncpu for c in cores):
        raise CompressError(f"--cores: core numbers must be between 0 and {ncpu - 1}")
    status = {r: runtime_status(r) for r in runtimes}
    result = {"machine": machine(), "runtimes": status, "warmup": warmup, "runs": runs, "files": [], "cells": []}
    for i, f in enumerate(files):
        f = Path(f)
        if f.stat().st_size == 0:
            raise CompressError(f"{f} is not a readable ONNX file (it is empty, 0 bytes)")
        try:
            _, dims = bench.input_spec(f)
        except CompressError:
            raise
        except Exception as e:  # noqa: BLE001
            why = "its bytes are not an ONNX model" if type(e).__name__ == "DecodeError" else type(e).__name__
            raise CompressError(f"{f} is not a readable ONNX file ({why})") from None
        bench.require_images(f, dims)
        label = labels[i] if labels else f.stem
        result["files"].append({"file": str(f), "label": label, "size_bytes": f.stat().st_size, "input": dims})
        file_sizes = sizes or [dims[-1] or 224]
        for runtime in runtimes:
            for t in threads:
                pinned = cores[:t] if cores else bench.default_cores(t)
                for b in batches:
                    for s in file_sizes:
                        cell = {"label": label, "runtime": runtime, "threads": t, "cores": pinned, "batch": b, "size": s}
                        if not status[runtime]["available"]:
                            cell["error"] = status[runtime]["reason"]
                        elif dims[-1] is not None and dims[-1] != s:
                            cell["error"] = f"fixed input {dims[-1]}×{dims[-1]}"
                        elif dims[0] is not None and dims[0] != b:
                            cell["error"] = f"fixed batch {dims[0]}"
                        else:
                            try:
                                cell.update(bench.measure(f, runtime, threads=t, batch=b, size=s, cores=pinned,
                                                          warmup=warmup, runs=runs, timeout=CELL_TIMEOUT_S))
                            except CompressError as e:
                                cell["error"] = str(e)
                        # a cell that cannot be measured is in the report's note column (and in the one
                        # error line when no cell could be measured)
                        log.log(logging.DEBUG if "error" in cell else logging.INFO,
                                f"[bench] {label} {runtime} {t} thread(s) batch {b} {s}×{s}: " + (
                                    cell["error"] if "error" in cell else
                                    f"p50 {cell['p50_ms']:.3f} ms, {cell['throughput_ips']:.0f} img/s, "
                                    f"load {cell['load_ms']:.0f} ms, peak {cell['peak_rss_mb']:.0f} MB"))
                        result["cells"].append(cell)
    return result


def _fmt(cell: dict, key: str, spec: str) -> str:
    return "—" if "error" in cell else format(cell[key], spec)


HEAD = ["model", "runtime", "threads (cores)", "batch", "input", "p50 ms", "p90 ms", "p99 ms", "throughput img/s",
        "peak memory MB", "session MB", "load ms", "note"]


def rows(result: dict) -> list[list[str]]:
    out = []
    for c in result["cells"]:
        out.append([c["label"], c["runtime"], f"{c['threads']} ({','.join(map(str, c['cores']))})", str(c["batch"]),
                    f"{c['size']}×{c['size']}", _fmt(c, "p50_ms", ".3f"), _fmt(c, "p90_ms", ".3f"), _fmt(c, "p99_ms", ".3f"),
                    _fmt(c, "throughput_ips", ".0f"), _fmt(c, "peak_rss_mb", ".0f"), _fmt(c, "session_mb", ".1f"),
                    _fmt(c, "load_ms", ".0f"), c.get("error", "")])
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Edge latency report", "",
             f"{m['cpu']}, {m['cores']} cores, {m['system']}. Each cell: a fresh process pinned to the listed "
             f"cores, {result['warmup']} warm-up runs, then {result['runs']} timed runs; load time includes the "
             "first inference. Peak memory is the process's peak resident set; session MB what loading and "
             "running added to it.", "", "Runtimes: " + "; ".join(
                 f"{k} {v['version']}" if v["available"] else f"{k}: {v['reason']}" for k, v in result["runtimes"].items()),
             "", "| file | size |", "|---|---|"]
    lines += [f"| {f['label']} (`{Path(f['file']).name}`) | {f['size_bytes'] / 1e6:.2f} MB |" for f in result["files"]]
    lines += ["", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(result)]
    return "\n".join(lines) + "\n"


def plots(result: dict) -> list[tuple[bytes, str]]:
    from compress.html import figure_png, pyplot

    plt = pyplot()
    ok = [c for c in result["cells"] if "error" not in c]
    if not ok:
        return []
    labels = list(dict.fromkeys(f["label"] for f in result["files"]))
    series = list(dict.fromkeys((c["runtime"], c["threads"]) for c in ok))
    b0, figs = min(c["batch"] for c in ok), []
    for key, title, ylabel in (("p50_ms", "p50 latency (lower is better)", "p50 latency, ms"),
                               ("throughput_ips", "throughput (higher is better)", "images per second")):
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels) * max(1, len(series)) / 2), 4))
        width = 0.8 / max(1, len(series))
        for j, (rt, t) in enumerate(series):
            vals = []
            for lab in labels:
                hit = [c[key] for c in ok if c["label"] == lab and c["runtime"] == rt and c["threads"] == t and c["batch"] == b0]
                vals.append(hit[0] if hit else 0.0)
            ax.bar([i + j * width for i in range(len(labels))], vals, width, label=f"{rt}, {t} thread(s)")
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels, rotation=15)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}, batch {b0}")
        ax.legend(fontsize=8)
        figs.append((figure_png(fig), f"{title}, batch {b0}"))
    return figs


def html_page(result: dict) -> str:
    from compress import html as H

    m = result["machine"]
    body = [f"<p class='note'>{H.esc(m['cpu'])}, {m['cores']} cores. Each cell runs in a fresh process pinned "
            f"to the listed cores; {result['warmup']} warm-up runs, {result['runs']} timed runs.</p>",
            H.table(["runtime", "status"], [[k, v.get("version") or v.get("reason")] for k, v in result["runtimes"].items()])]
    body.append(H.table(["model", "file", "size MB"], [[f["label"], Path(f["file"]).name, f"{f['size_bytes'] / 1e6:.2f}"]
                                                        for f in result["files"]]))
    for png, cap in plots(result):
        body.append(H.img(png, cap, cap))
    body.append("<h2>All cells</h2>")
    body.append(H.table(HEAD, rows(result)))
    return H.page("Edge latency report", body)


def write_report(result: dict, out: Path) -> None:
    from compress.fsio import write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", result)
    write_text(out / "bench.md", markdown(result))
    write_text(out / "bench.html", html_page(result))
