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


ROLE_LABELS = {"teacher": "teacher", "student": "student FP32", "student_pruned": "student pruned FP32",
               "student_int8": "student INT8 (QAT)", "student_int8_ptq": "student INT8 (PTQ)"}
_TORCH_STAGE = {"teacher": "teacher", "student": "distill", "student_pruned": "prune", "student_int8": "quantize"}


def _rows(ctx: RunContext) -> list[dict]:
    res = ctx.results
    bench = res["bench"].metrics["models"] if "bench" in res else {}
    export = res["export"].metrics if "export" in res else {}
    exported = [k for k, v in export.items() if isinstance(v, dict) and "file" in v]
    roles = list(bench) or exported or [r for r, st in _TORCH_STAGE.items() if st in res]
    rows = []
    for role in roles:
        stage = _TORCH_STAGE.get(role)
        m = res[stage].metrics if stage in res else {}
        b, e = bench.get(role, {}), export.get(role, {})
        distill = res["distill"].metrics if "distill" in res else {}
        # quantized files keep the architecture they were made from: the pruned one when pruning ran
        arch_src = res["prune"].metrics if "prune" in res and role != "student" else distill
        review = b.get("review") or (distill if role == "student" else {})
        rows.append({
            "role": role,
            "label": ROLE_LABELS.get(role, role),
            "model": b.get("model") or m.get("model") or distill.get("model"),
            "precision": b.get("precision", "int8" if "int8" in role else "fp32"),
            # quantization keeps the student's architecture: its parameter and MAC counts are the student's
            "params": b.get("params", m.get("params", arch_src.get("params"))),
            "macs": (b.get("macs") or {}).get(str(ctx.cfg.data.image_size), m.get("macs", arch_src.get("macs"))),
            "macs_by_size": b.get("macs", {}),
            "torch_accuracy": m.get("test_accuracy"),
            "onnx_accuracy": b.get("onnx_accuracy", e.get("onnx_accuracy")),
            "onnx_size_bytes": b.get("size_bytes", e.get("size_bytes")),
            "latency": b.get("latency", []),
            "distillation_factor": review.get("distillation_factor"),
            "relative_error": review.get("relative_error"),
            "kl_teacher_student": review.get("kl_teacher_student"),
            "correlation": review.get("correlation"),
        })
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
        params = ", ".join(f"{k} = {v}" for k, v in m.get("method_params", {}).items())
        lines.append(f"Distillation: method `{m['method']}`, α = {m['alpha']}, T = {m['temperature']}"
                     + (f"; {params}" if params else "") + (f"; assistant `{m['assistant']}`" if m.get("assistant") else "")
                     + ".")
    lines += ["", "## Teacher vs student", ""]
    settings = []
    for row in rows:
        for lat in row["latency"]:
            key = (lat["image_size"], lat["threads_setting"])
            if key not in settings:
                settings.append(key)
    head = ["", *[f"{r['label']} `{r['model']}`" for r in rows]]
    table = [
        ("params", [_fmt(r["params"], ",", "n/a") for r in rows]),
        (f"MACs ({d['image_size']}×{d['image_size']})", [_fmt(r["macs"] and r["macs"] / 1e6, ".2f") + " M" for r in rows]),
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
        ("accuracy, PyTorch (INT8: fake-quant)", [_fmt(r["torch_accuracy"], ".4f", "—") for r in rows]),
        ("accuracy, ONNX (onnxruntime)", [_fmt(r["onnx_accuracy"]) for r in rows]),
        ("distillation factor P_t/P_s (eq. 7)", [_fmt(r.get("distillation_factor"), ".2f", "—") for r in rows]),
        ("relative error E_s/E_t (eq. 6)", [_fmt(r.get("relative_error"), ".3f", "—" if r["role"] == "teacher" else "n/a") for r in rows]),
        ("KL(P_t ‖ P_s) (eq. 8)", [_fmt(r.get("kl_teacher_student"), ".4f", "—") for r in rows]),
        ("correlation ρ(P_t, P_s) (eq. 9)", [_fmt(r.get("correlation"), ".4f", "—") for r in rows]),
    ]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for label, cells in table:
        lines.append("| " + " | ".join([label, *cells]) + " |")
    if "prune" in ctx.results:
        p = ctx.results["prune"].metrics
        target = ", ".join(f"{k} {v}" for k, v in p["target"].items())
        lines += ["", "## Pruning", "",
                  f"Importance `{p['importance']}`, target {target}: MACs {p['unpruned_macs'] / 1e6:.2f} M → "
                  f"{p['macs'] / 1e6:.2f} M ({p['macs_reduction']:.1%} fewer), parameters {p['unpruned_params']:,} → "
                  f"{p['params']:,}.", "",
                  "| step | MACs | params | accuracy after pruning | accuracy after fine-tuning |", "|---|---|---|---|---|",
                  f"| unpruned | {p['unpruned_macs'] / 1e6:.2f} M | {p['unpruned_params']:,} | {p['unpruned_accuracy']:.4f} | — |"]
        for st in p["steps"]:
            lines.append(f"| {st['step']} | {st['macs'] / 1e6:.2f} M | {st['params']:,} | {st['accuracy_after_pruning']:.4f} "
                         f"| {st['accuracy_after_finetune']:.4f} |")
        if p["left_whole"]:
            lines += ["", "Left whole: " + "; ".join(p["left_whole"]) + "."]
    if "export" in ctx.results:
        lines += ["", "## ONNX parity (whole test split, onnxruntime vs PyTorch)", "",
                  "| model | file | max abs logit diff | argmax agreement | convolutions onnxruntime runs in int8 / float |",
                  "|---|---|---|---|---|"]
        for role, e in ctx.results["export"].metrics.items():
            if not isinstance(e, dict) or "file" not in e:
                continue
            p, k = e.get("parity"), e.get("kernels")
            diff = f"{p['max_abs_logit_diff']:.2e}" if p else "—"
            agree = f"{p['argmax_agreement']:.2%}" if p else "— (no PyTorch twin)"
            kern = f"{k['quantized_convolutions']} / {k['float_convolutions']}" if k else "— (FP32)"
            lines.append(f"| {ROLE_LABELS.get(role, role)} | `{e['file']}` | {diff} | {agree} | {kern} |")
    lines += ["", "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    for n, r in ctx.results.items():
        lines.append(f"| {n} | {'skipped (unchanged)' if r.skipped else 'ran'} | {r.metrics.get('stage_seconds', 0):.1f} |")
    return "\n".join(lines) + "\n"


def write_reports(ctx: RunContext) -> None:
    s = summary(ctx)
    write_json(ctx.run_dir / "summary.json", s)
    write_text(ctx.run_dir / "report.md", markdown(ctx, s["table"]))
