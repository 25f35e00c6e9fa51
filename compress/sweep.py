"""``compress sweep``: how small can the student be for the accuracy needed, and how fast does it run?

One teacher (trained once, cached), many students, each trained with every method of ``series`` (KD
and from scratch by default) on the same budget; each (student, series) is its own pipeline run under
``artifacts/<name>/runs/`` so an interrupted sweep resumes and a finished one retrains nothing.
Latency depends on the architecture only: it is measured once per student (FP32 and onnxruntime PTQ
INT8 at ``latency_size``, each with :func:`compress.bench.latency`: a fresh process pinned to as many
cores as ``threads``) and cached. Writes sweep.csv, sweep.json, the review's curves (accuracy vs
distillation factor, accuracy vs relative error) and accuracy vs latency with the Pareto front, as PNG
files and in report.html / report.md."""

from __future__ import annotations

import csv
import io
import logging
import shutil
from pathlib import Path

from compress.bench import latency
from compress.config import PipelineConfig, validate_recipe
from compress.context import RunContext
from compress.data import calibration_array
from compress.errors import ConfigError
from compress.export import export_onnx
from compress.fsio import read_json, sha256_json, write_bytes, write_json, write_text
from compress.models import list_models
from compress.pipeline import run_lock, run_pipeline
from compress.qat import ptq_static
from compress.report import write_reports
from compress.stages.common import load_stage_model

log = logging.getLogger(__name__)

COLUMNS = ["student", "series", "params", "macs", "distillation_factor", "relative_error", "accuracy",
           "kl_teacher_student", "correlation", "fp32_latency_ms", "int8_latency_ms", "train_seconds"]
PLOTS = {"accuracy_vs_distillation_factor.png": "accuracy vs distillation factor",
         "accuracy_vs_relative_error.png": "accuracy vs relative error",
         "accuracy_vs_latency.png": "accuracy vs latency"}


def students(cfg: PipelineConfig) -> list[str]:
    return list(cfg.sweep.students) or [s.name for s in list_models(role="student")]


def run_config(cfg: PipelineConfig, student: str, series: str) -> PipelineConfig:
    raw = cfg.model_dump(mode="json")
    raw.pop("sweep")
    raw.pop("compare", None)
    raw.update(name=f"{student}-{series}", stages=["teacher", "distill"])
    raw["distill"].update(student=student, method=series, params={})
    return validate_recipe(raw, f"sweep.{student}.{series}")


def measure_latency(ctx: RunContext, cfg: PipelineConfig, out_dir: Path) -> dict:
    """FP32 and PTQ-INT8 latency of the run's student at the sweep's size, cached per architecture."""
    sw = cfg.sweep
    student = ctx.results["distill"].metrics["model"]
    key = sha256_json({"student": student, "size": sw.latency_size, "runs": sw.latency_runs, "threads": sw.threads,
                       "opset": cfg.export.opset, "measure": "fresh pinned process"})
    path = out_dir / "latency" / f"{student}.json"
    if path.is_file():
        try:
            saved = read_json(path)
            if saved.get("key") == key:
                return saved
        except ValueError:
            pass
    work = out_dir / "latency" / f".{student}"
    work.mkdir(parents=True, exist_ok=True)
    model = load_stage_model(ctx, "distill")
    fp32, int8 = work / "fp32.onnx", work / "int8.onnx"
    export_onnx(model, fp32, sw.latency_size, opset=cfg.export.opset)
    ptq_static(fp32, int8, calibration_array(ctx.data.train, sw.latency_size, 64))
    result = {"key": key, "student": student, "size": sw.latency_size, "threads": sw.threads}
    for tag, f in (("fp32", fp32), ("int8", int8)):
        lat = latency(f, sw.latency_size, threads=sw.threads, warmup=5, runs=sw.latency_runs)
        result[f"{tag}_p50_ms"] = lat["p50_ms"]
        result[f"{tag}_size_bytes"] = f.stat().st_size
        result["cores"] = lat["cores"]
    log.info(f"[sweep] {student}: p50 FP32 {result['fp32_p50_ms']:.2f} ms, INT8 {result['int8_p50_ms']:.2f} ms "
        f"at {sw.latency_size}×{sw.latency_size}, {sw.threads} thread(s) pinned to cores "
        f"{','.join(map(str, result['cores']))}")
    write_json(path, result)
    shutil.rmtree(work, ignore_errors=True)
    return result


def run_sweep(cfg: PipelineConfig, artifacts: Path = Path("artifacts"), force: bool = False) -> dict:
    if cfg.sweep is None:
        raise ConfigError(f"recipe {cfg.name!r} has no sweep section (sweep.students, sweep.series)")
    configs = {(s, m): run_config(cfg, s, m) for s in students(cfg) for m in cfg.sweep.series}  # all checked first
    with run_lock(artifacts / cfg.name, cfg.name):  # one sweep of this name at a time
        return _run_sweep(cfg, configs, artifacts, force)


def _run_sweep(cfg: PipelineConfig, configs: dict[tuple[str, str], PipelineConfig], artifacts: Path,
               force: bool) -> dict:
    assert cfg.sweep is not None
    out_dir = artifacts / cfg.name
    rows, teacher = [], None
    for i, (student, series) in enumerate(configs):
        log.info(f"[sweep] {i + 1}/{len(configs)}: {student} {series}")
        ctx = run_pipeline(configs[(student, series)], artifacts=out_dir / "runs", force=force,
                           cache_dir=artifacts / ".cache", finish=write_reports)
        m = ctx.results["distill"].metrics
        teacher = ctx.results["teacher"].metrics
        lat = measure_latency(ctx, cfg, out_dir)
        rows.append({"student": student, "series": series, "params": m["params"], "macs": m["macs"],
                     "distillation_factor": m["distillation_factor"], "relative_error": m["relative_error"],
                     "accuracy": m["accuracy"], "kl_teacher_student": m["kl_teacher_student"],
                     "correlation": m["correlation"], "fp32_latency_ms": lat["fp32_p50_ms"],
                     "int8_latency_ms": lat["int8_p50_ms"], "train_seconds": m["train_seconds"]})
    result = {"name": cfg.name, "teacher": teacher["model"], "teacher_accuracy": teacher["test_accuracy"],
              "teacher_params": teacher["params"], "epochs": cfg.distill.epochs, "series": cfg.sweep.series,
              "latency": {"size": cfg.sweep.latency_size, "threads": cfg.sweep.threads, "runs": cfg.sweep.latency_runs,
                          "statistic": "p50"}, "pareto": pareto(rows), "rows": rows}
    write_json(out_dir / "sweep.json", result)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(out_dir / "sweep.csv", buf.getvalue())
    figs = plots(result)
    for fname, png in figs.items():
        write_bytes(out_dir / fname, png)
    write_text(out_dir / "report.md", markdown(result))
    write_text(out_dir / "report.html", html_page(result, figs))
    log.info(f"[sweep] wrote {out_dir}/sweep.csv, sweep.json, report.html and {len(figs)} plots")
    return result


def pareto(rows: list[dict]) -> list[int]:
    """Indices of the rows no other row beats on both latency (lower) and accuracy (higher)."""
    front = []
    for i, r in enumerate(rows):
        dominated = any(o["fp32_latency_ms"] <= r["fp32_latency_ms"] and o["accuracy"] >= r["accuracy"]
                        and (o["fp32_latency_ms"] < r["fp32_latency_ms"] or o["accuracy"] > r["accuracy"])
                        for j, o in enumerate(rows) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: rows[i]["fp32_latency_ms"])


def plots(result: dict) -> dict[str, bytes]:
    from compress.html import figure_png, pyplot

    plt = pyplot()
    rows, out = result["rows"], {}
    markers = ["o", "s", "^", "D", "v", "P"]
    lat = result["latency"]
    specs = [("accuracy_vs_distillation_factor.png", "distillation_factor",
              "distillation factor P_t / P_s (eq. 7, log scale)", True),
             ("accuracy_vs_relative_error.png", "relative_error", "relative error E_s / E_t (eq. 6)", False),
             ("accuracy_vs_latency.png", "fp32_latency_ms",
              f"FP32 latency, ms (p50, {lat['size']}×{lat['size']}, {lat['threads']} thread, onnxruntime)", False)]
    for fname, key, xlabel, logx in specs:
        fig, ax = plt.subplots(figsize=(8, 5))
        for k, series in enumerate(result["series"]):
            pts = [r for r in rows if r["series"] == series]
            ax.scatter([r[key] for r in pts], [r["accuracy"] for r in pts], marker=markers[k % len(markers)], s=40,
                       label=series + (" (from scratch)" if series == "scratch" else ""), zorder=3)
            for r in pts:
                ax.annotate(r["student"].replace("mobilenet", "mb").replace("shufflenet_", "sn_"), (r[key], r["accuracy"]),
                            fontsize=6, xytext=(3, 2), textcoords="offset points")
        if key == "fp32_latency_ms" and result["pareto"]:
            front = [rows[i] for i in result["pareto"]]
            ax.step([r[key] for r in front], [r["accuracy"] for r in front], where="post", color="k", lw=1,
                    label="Pareto front", zorder=2)
            ax.scatter([r[key] for r in front], [r["accuracy"] for r in front], s=110, facecolors="none",
                       edgecolors="k", zorder=4)
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{PLOTS[fname]}: students of teacher {result['teacher']} ({result['teacher_accuracy']:.4f})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out[fname] = figure_png(fig)
    return out


def _table(result: dict) -> tuple[list[str], list[list[str]]]:
    head = ["student", "series", "params", "MACs (M)", "distillation factor", "relative error", "accuracy", "KL",
            "correlation", "FP32 ms", "INT8 ms", "Pareto"]
    front = set(result["pareto"])
    body = [[r["student"], r["series"], f"{r['params']:,}", f"{r['macs'] / 1e6:.2f}", f"{r['distillation_factor']:.2f}",
             f"{r['relative_error']:.3f}", f"{r['accuracy']:.4f}", f"{r['kl_teacher_student']:.4f}",
             f"{r['correlation']:.4f}", f"{r['fp32_latency_ms']:.3f}", f"{r['int8_latency_ms']:.3f}",
             "yes" if i in front else ""] for i, r in enumerate(result["rows"])]
    return head, body


def _intro(result: dict) -> str:
    lat = result["latency"]
    return (f"Teacher `{result['teacher']}` (test accuracy {result['teacher_accuracy']:.4f}, "
            f"{result['teacher_params']:,} parameters); every student trained {result['epochs']} epochs per series "
            f"({', '.join(result['series'])}). Latency: onnxruntime CPU, p50 at {lat['size']}×{lat['size']}, batch 1, "
            f"{lat['threads']} thread, each file in a fresh process pinned to as many cores; INT8 is onnxruntime's "
            "quantize_static of the FP32 file. Pareto: no other row is both faster (FP32) and more accurate.")


def markdown(result: dict) -> str:
    head, body = _table(result)
    lines = [f"# Sweep `{result['name']}`", "", _intro(result), "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    lines += ["", *[f"![{title}]({fname})" for fname, title in PLOTS.items()]]
    return "\n".join(lines) + "\n"


def html_page(result: dict, figs: dict[str, bytes]) -> str:
    from compress import html as H

    head, body = _table(result)
    parts = [f"<p class='note'>{H.esc(_intro(result))}</p>"]
    parts += [H.img(png, PLOTS[f], PLOTS[f]) for f, png in figs.items()]
    parts += ["<h2>Students</h2>", H.table(head, body)]
    return H.page(f"Sweep {result['name']}", parts)
