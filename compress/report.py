"""summary.json and report.md: the teacher-vs-student table, built from the stages' metrics."""

from __future__ import annotations

from compress import __version__
from compress.fsio import write_json, write_text
from compress.pipeline import RunContext


def _fmt(v, spec: str = ".4f", none: str = "n/a") -> str:
    if v is None:
        return none
    return format(v, spec)


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f} MB"


def _rows(ctx: RunContext) -> list[dict]:
    res = ctx.results
    teacher = res.get("teacher")
    distill = res.get("distill")
    bench = res["bench"].metrics["models"] if "bench" in res else {}
    export = res["export"].metrics if "export" in res else {}
    rows = []
    if teacher:
        t = teacher.metrics
        rows.append({"role": "teacher", "model": t["model"], "params": t["params"], "macs": t["macs"],
                     "torch_accuracy": t["test_accuracy"]})
    if distill:
        d = distill.metrics
        rows.append({"role": "student", "model": d["model"], "params": d["params"], "macs": d["macs"],
                     "torch_accuracy": d["test_accuracy"], "distillation_factor": d["distillation_factor"],
                     "relative_error": d["relative_error"], "kl_teacher_student": d["kl_teacher_student"],
                     "correlation": d["correlation"]})
    for row in rows:
        b = bench.get(row["role"], {})
        e = export.get(row["role"], {})
        row["onnx_size_bytes"] = b.get("size_bytes", e.get("size_bytes"))
        row["onnx_accuracy"] = b.get("onnx_accuracy", e.get("parity", {}).get("onnx_accuracy"))
        row["latency"] = b.get("latency", [])
        row["macs_by_size"] = b.get("macs", {})
    return rows


def summary(ctx: RunContext) -> dict:
    return {
        "run": ctx.cfg.name,
        "compress_version": __version__,
        "config": ctx.cfg.model_dump(mode="json"),
        "dataset": ctx.data.describe() if ctx.results else None,
        "stages": {n: {"fingerprint": r.fingerprint, "skipped": r.skipped, "dir": str(r.dir.name),
                       "metrics": r.metrics} for n, r in ctx.results.items()},
        "table": _rows(ctx),
    }


def markdown(ctx: RunContext, rows: list[dict]) -> str:
    cfg = ctx.cfg
    lines = [f"# compress run `{cfg.name}`", ""]
    d = ctx.data.describe()
    lines.append(f"Dataset **{d['dataset']}** ({d['num_classes']} classes; train/val/test "
                 f"{d['sizes']['train']}/{d['sizes']['val']}/{d['sizes']['test']} images at "
                 f"{d['image_size']}×{d['image_size']}). Accuracy is on the test split.")
    if "distill" in ctx.results:
        m = ctx.results["distill"].metrics
        lines.append(f"Distillation: loss `{m['loss']}`, α = {m['alpha']}, T = {m['temperature']}.")
    lines += ["", "## Teacher vs student", ""]
    settings = []
    for row in rows:
        for lat in row["latency"]:
            key = (lat["image_size"], lat["threads_setting"])
            if key not in settings:
                settings.append(key)
    head = ["", *[f"{r['role']} `{r['model']}`" for r in rows]]
    table = [
        ("params", [f"{r['params']:,}" for r in rows]),
        (f"MACs ({d['image_size']}×{d['image_size']})", [f"{r['macs'] / 1e6:.2f} M" for r in rows]),
    ]
    for size in sorted({int(s) for r in rows for s in r["macs_by_size"]} - {d["image_size"]}):
        table.append((f"MACs ({size}×{size})", [f"{r['macs_by_size'].get(str(size), 0) / 1e6:.2f} M" for r in rows]))
    table.append(("ONNX size", [_mb(r["onnx_size_bytes"]) for r in rows]))
    for size, setting in settings:
        cells = []
        for r in rows:
            lat = next((x for x in r["latency"] if (x["image_size"], x["threads_setting"]) == (size, setting)), None)
            cells.append("n/a" if lat is None else f"{lat['mean_ms']:.3f} / {lat['p50_ms']:.3f} / {lat['p99_ms']:.3f}")
        table.append((f"latency ms mean/p50/p99, {size}×{size}, batch 1, {setting}", cells))
    table += [
        ("accuracy, PyTorch", [_fmt(r["torch_accuracy"]) for r in rows]),
        ("accuracy, ONNX (onnxruntime)", [_fmt(r["onnx_accuracy"]) for r in rows]),
        ("distillation factor P_t/P_s (eq. 7)", [_fmt(r.get("distillation_factor"), ".2f", "—") for r in rows]),
        ("relative error E_s/E_t (eq. 6)", [_fmt(r.get("relative_error"), ".3f", "—" if r["role"] == "teacher" else "n/a (teacher error 0)") for r in rows]),
        ("KL(P_t ‖ P_s) (eq. 8)", [_fmt(r.get("kl_teacher_student"), ".4f", "—") for r in rows]),
        ("correlation ρ(P_t, P_s) (eq. 9)", [_fmt(r.get("correlation"), ".4f", "—") for r in rows]),
    ]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for label, cells in table:
        lines.append("| " + " | ".join([label, *cells]) + " |")
    if "export" in ctx.results:
        lines += ["", "## ONNX parity (whole test split, onnxruntime vs PyTorch)", "",
                  "| model | file | max abs logit diff | argmax agreement |", "|---|---|---|---|"]
        for role, e in ctx.results["export"].metrics.items():
            if isinstance(e, dict) and "parity" in e:
                p = e["parity"]
                lines.append(f"| {role} | `{e['file']}` | {p['max_abs_logit_diff']:.2e} | {p['argmax_agreement']:.2%} |")
    lines += ["", "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    for n, r in ctx.results.items():
        lines.append(f"| {n} | {'skipped (unchanged)' if r.skipped else 'ran'} | {r.metrics.get('stage_seconds', 0):.1f} |")
    return "\n".join(lines) + "\n"


def write_reports(ctx: RunContext) -> None:
    s = summary(ctx)
    write_json(ctx.run_dir / "summary.json", s)
    write_text(ctx.run_dir / "report.md", markdown(ctx, s["table"]))
