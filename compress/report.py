"""summary.json, report.md and report.html of a run: the teacher-vs-student table, built from the
stages' metrics and the artifact table. Asked for by whoever ran the pipeline (the CLI, compare,
sweep); the runner writes no report."""

from __future__ import annotations

from compress import __version__
from compress.artifacts import ARTIFACTS, TABLE, architecture_stage
from compress.context import RunContext, describe_derived
from compress.fsio import write_json, write_text


def _fmt(v, spec: str = ".4f", none: str = "n/a") -> str:
    if v is None:
        return none
    return format(v, spec)


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f} MB"


def _rows(ctx: RunContext) -> list[dict]:
    res = ctx.results
    bench = res["bench"].metrics["models"] if "bench" in res else {}
    export = res["export"].metrics if "export" in res else {}
    roles = list(bench) or [r for r in export if r in ARTIFACTS] or \
        [a.role for a in TABLE if a.has_torch_twin and a.stage in res]
    rows = []
    for role in roles:
        artifact = ARTIFACTS[role]
        m = res[artifact.stage].metrics if artifact.has_torch_twin and artifact.stage in res else {}
        b, e = bench.get(role, {}), export.get(role, {})
        distill = res["distill"].metrics if "distill" in res else {}
        # quantized files keep the architecture they were made from: the pruned one when pruning ran
        arch_stage = architecture_stage(artifact, ctx.cfg.stages)
        arch_src = res[arch_stage].metrics if arch_stage in res and artifact.stage != "teacher" else distill
        review = b.get("review") or (distill if role == "student" else {})
        rows.append({
            "role": role,
            "label": artifact.label,
            "model": b.get("model") or m.get("model") or distill.get("model"),
            "precision": b.get("precision", artifact.precision),
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
        "lineage": lineage(ctx),
        "derived": ctx.derived,
    }


def method_line(m: dict, code=lambda t: t) -> str:
    """"Distillation: method kd, α = 0.5, T = 4; ...": the method and the values it computed with."""
    params = ", ".join(f"{k} = {v}" for k, v in m.get("method_params", {}).items())
    used = m.get("in_effect")
    if used is None:  # a stage folder whose metrics predate the record: eq. (1)'s values, where read
        from compress.distill import METHODS

        reads = METHODS[m["method"]].reads if m["method"] in METHODS else ()
        used = {f"distill.{k}": m[k] for k in reads if k in m}
    return (f"Distillation: method {code(m['method'])}" + (f", {in_effect(used)}" if used else "")
            + (f"; {params}" if params else "") + (f"; assistant {code(m['assistant'])}" if m.get("assistant") else "")
            + ".")


def in_effect(used: dict[str, float]) -> str:
    """"α = 0.9, T = 4.0": the α and temperature a method computed with, each from the recipe key
    named in brackets when it is the method's own (``params``)."""
    signs = {"alpha": "α", "temperature": "T"}
    parts = []
    for key, value in used.items():
        short = key.rsplit(".", 1)[1]
        parts.append(f"{signs[short]} = {value:g}" + (f" (params.{short})" if ".params." in key else ""))
    return ", ".join(parts)


def data_notes(d: dict) -> list[str]:
    """What the report says about images left out or repeated, one sentence each (none for a clean set)."""
    notes = []
    if d.get("skipped_images"):
        notes.append(f"{d['skipped_images']} unreadable image(s) were left out (data.skip_bad_images).")
    if d.get("symlink_loops"):
        notes.append(f"{d['symlink_loops']} symlinked folder(s) leading back into the image folder (a loop) "
                     "were not followed.")
    if d.get("repeated_files"):
        notes.append(f"{d['repeated_files']} path(s) reaching an image already counted (symlinks, hard links) "
                     "were left out: each image is counted once, in one split.")
    if d.get("identical_across_splits"):
        first = d.get("identical_examples") or []
        example = f" (first: {first[0][0]} = {first[0][1]})" if first else ""
        notes.append(f"{d['identical_across_splits']} image(s) of the val/test splits have the same bytes as an "
                     f"image of an earlier split{example}; they were kept.")
    return notes


#: the file a run ships, by the stages that ran: the quantized student, else the pruned, else the distilled
DELIVERABLE_ORDER = ("student_int8", "student_pruned", "student")


def _latency_at(row: dict, size: int, setting: str) -> dict | None:
    """The row's latency measured at ``size`` with ``setting`` threads, if it was."""
    return next((x for x in row["latency"] if (x["image_size"], x["threads_setting"]) == (size, setting)), None)


def _main_latency(ctx: RunContext, row: dict) -> dict | None:
    """The row's latency at the bench's main setting: the data's input size, the first thread count."""
    lats = [x for x in row["latency"] if x["image_size"] == ctx.data.image_size] or row["latency"]
    return lats[0] if lats else None


def headline(ctx: RunContext, rows: list[dict], code=lambda t: t) -> list[str]:
    """What to ship, in two or three sentences: the file, its accuracy against the teacher's, how much
    faster and smaller than the teacher it is at the bench's main setting, and a warning when the INT8
    file is slower than the FP32 student it was made from. Empty when no student file was measured."""
    by_role = {r["role"]: r for r in rows}
    role = next((r for r in DELIVERABLE_ORDER if r in by_role and by_role[r]["onnx_accuracy"] is not None), None)
    if role is None:
        return []
    ship, teacher = by_role[role], by_role.get("teacher")
    artifact = ARTIFACTS[role]
    lines = []
    acc = f"accuracy {ship['onnx_accuracy']:.4f} on the test split (onnxruntime)"
    if teacher and teacher["onnx_accuracy"] is not None:
        delta = 100 * (ship["onnx_accuracy"] - teacher["onnx_accuracy"])
        acc += f" against the teacher's {teacher['onnx_accuracy']:.4f} ({delta:+.1f} points)"
    lines.append(f"Ship {code(artifact.file)} ({artifact.label} {code(ship['model'])}): {acc}.")
    mine = _main_latency(ctx, ship)
    theirs = _main_latency(ctx, teacher) if teacher else None
    speed = []
    if mine and theirs and mine["image_size"] == theirs["image_size"] and mine["threads_setting"] == theirs["threads_setting"]:
        ratio = theirs["p50_ms"] / mine["p50_ms"]
        speed.append((f"{ratio:.1f}× faster" if ratio >= 1 else f"{1 / ratio:.1f}× slower")
                     + f" (p50 {mine['p50_ms']:.3f} ms against "
                     f"{theirs['p50_ms']:.3f} ms at {mine['image_size']}×{mine['image_size']}, batch 1, "
                     f"{mine['threads_setting']})")
    if teacher and ship["onnx_size_bytes"] and teacher["onnx_size_bytes"]:
        speed.append(f"{teacher['onnx_size_bytes'] / ship['onnx_size_bytes']:.1f}× smaller "
                     f"({_mb(ship['onnx_size_bytes'])} against {_mb(teacher['onnx_size_bytes'])})")
    if speed:
        lines.append("Against the teacher: " + ", ".join(speed) + ".")
    if artifact.precision == "int8":
        source = ARTIFACTS["student_pruned" if "student_pruned" in by_role else "student"]
        fp32 = by_role.get(source.role)
        slower = []
        for lat in ship["latency"] if fp32 else []:
            other = _latency_at(fp32, lat["image_size"], lat["threads_setting"])
            if other and other["p50_ms"] < lat["p50_ms"]:
                slower.append(f"{lat['image_size']}×{lat['image_size']}, {lat['threads_setting']}: "
                              f"{lat['p50_ms']:.3f} ms against {other['p50_ms']:.3f} ms, "
                              f"{lat['p50_ms'] / other['p50_ms']:.2f}×")
        if slower:
            acc32 = f" (accuracy {fp32['onnx_accuracy']:.4f})" if fp32["onnx_accuracy"] is not None else ""
            size = (f"; the INT8 file buys size ({_mb(ship['onnx_size_bytes'])} against "
                    f"{_mb(fp32['onnx_size_bytes'])})") if ship["onnx_size_bytes"] and fp32["onnx_size_bytes"] else ""
            lines.append(f"Warning: on this machine the INT8 file is slower than the FP32 student it was made from "
                         f"({'; '.join(slower)}): where that setting is the one that matters, ship "
                         f"{code(source.file)}{acc32} for speed{size}.")
    return lines


def main_table(ctx: RunContext, rows: list[dict], code=lambda t: t) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The teacher-vs-student table: (header, [(row label, one cell per model)])."""
    d = ctx.data.describe()
    settings = []
    for row in rows:
        for lat in row["latency"]:
            key = (lat["image_size"], lat["threads_setting"])
            if key not in settings:
                settings.append(key)
    head = ["", *[f"{r['label']} {code(r['model'])}" for r in rows]]
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
            lat = _latency_at(r, size, setting)
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
    return head, table


def lineage(ctx: RunContext) -> dict:
    """Where the run's files come from: models, the recipe's hash and the versions that made them."""
    import importlib.metadata as md
    import platform

    from compress.fsio import sha256_json

    versions = {}
    for pkg in ("torch", "torchvision", "timm", "onnx", "onnxruntime", "openvino", "torch-pruning"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    distill = ctx.results["distill"].metrics if "distill" in ctx.results else {}
    return {"run": ctx.cfg.name, "teacher": distill.get("teacher") or ctx.cfg.teacher.model,
            "student": distill.get("model") or ctx.cfg.distill.student, "method": ctx.cfg.distill.method,
            "recipe_sha256": sha256_json(ctx.cfg.model_dump(mode="json")), "compress": __version__,
            "python": platform.python_version(), **versions}


def markdown(ctx: RunContext, rows: list[dict]) -> str:
    cfg = ctx.cfg
    lines = [f"# compress run `{cfg.name}`", ""]
    ship = headline(ctx, rows, code=lambda t: f"`{t}`")
    if ship:
        lines += [f"**{ship[0]}**", *ship[1:], ""]
    d = ctx.data.describe()
    lines.append(f"Dataset **{d['dataset']}** ({d['num_classes']} classes; train/val/test "
                 f"{d['sizes']['train']}/{d['sizes']['val']}/{d['sizes']['test']} images at "
                 f"{d['image_size']}×{d['image_size']}). Accuracy is on the test split.")
    lines += data_notes(d)
    if ctx.derived:
        lines.append("Derived from the data: " + "; ".join(describe_derived(ctx.derived)) + ".")
    if "distill" in ctx.results:
        lines.append(method_line(ctx.results["distill"].metrics, code=lambda t: f"`{t}`"))
    lines += ["", "## Teacher vs student", ""]
    head, table = main_table(ctx, rows, code=lambda t: f"`{t}`")
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
        for title, head, table, notes in export_tables(ctx.results["export"].metrics, code=lambda t: f"`{t}`"):
            lines += ["", f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in table]
            lines += [""] + notes if notes else []
    lines += ["", "## Stages", "", "| " + " | ".join(STAGE_HEAD) + " |", "|" + "---|" * len(STAGE_HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in stage_rows(ctx)]
    lines += ["", "## Lineage", "", "| | |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in lineage(ctx).items()]
    return "\n".join(lines) + "\n"


EXPORT_HEAD = ["model", "file", "compared with", "gate", "max abs Δlogit", "argmax agreement", "result",
               "convolutions onnxruntime runs in int8 / float"]


def _verdict(p: dict) -> str:
    return "passed" if p.get("passed", True) else "FAILED"


def _onnx_gate(artifact, p: dict | None, k: dict | None) -> tuple[str, str]:
    """(what the ONNX file is compared with, its gate) from its parity and kernel records."""
    int8 = "every convolution an int8 kernel" if k else ""
    if not p:
        return "— (no PyTorch twin)", int8 or "—"
    agree = p.get("min_argmax_agreement")
    gates = []
    if p.get("tolerance"):
        t = p["tolerance"]
        gates.append(f"abs Δlogit ≤ {t['atol']:g} + {t['rtol']:g} × the image's largest abs logit")
    if agree is not None:
        gates.append(f"agreement ≥ {agree:.2%}")
    gates += [int8] if int8 else []
    return ("PyTorch" if artifact.precision == "fp32" else "PyTorch fake-quant model"), "; ".join(gates) or "—"


def _usability(ep: dict) -> str:
    """One execution provider's verdicts, e.g. ``NO as is; YES with a fixed input shape (1 partition,
    100/100 nodes)``."""
    parts = []
    for key, words in (("as_is", "as is"), ("fixed_input_shape", "with a fixed input shape")):
        v = ep.get(key) or {}
        if "verdict" not in v:
            continue
        where = (f" ({v['partitions']} partition{'' if v['partitions'] == 1 else 's'}, {v['supported_nodes']}/"
                 f"{v['nodes']} nodes)" if "partitions" in v else "")
        parts.append(f"{v['verdict']} {words}{where}")
    return "; ".join(parts) or "n/a"


def export_tables(metrics: dict, code=lambda t: t) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """The export stage as (title, header, rows, notes) per table: every shipped file's check (what it
    is compared with, the gate with its tolerance, the measured numbers, the verdict), then
    onnxruntime's mobile usability verdict per student file. ``code`` marks file names."""
    rows, mobile = [], []
    for role, e in metrics.items():
        if role not in ARTIFACTS:
            continue
        a = ARTIFACTS[role]
        p, k = e.get("parity"), e.get("kernels")
        ref, gate = _onnx_gate(a, p, k)
        rows.append([a.label, code(e["file"]), ref, gate, f"{p['max_abs_logit_diff']:.2e}" if p else "—",
                     f"{p['argmax_agreement']:.2%}" if p else "—", _verdict(p or {}),
                     f"{k['quantized_convolutions']} / {k['float_convolutions']}" if k else "—"])
        if "ort" in e:
            o = e["ort"]["parity"]
            rows.append([a.label, code(e["ort"]["file"]), f"{code(e['file'])} (onnxruntime, extended optimizations)",
                         o["gate"], f"{o['max_abs_logit_diff']:.2e}", f"{o['argmax_agreement']:.2%}", _verdict(o), "—"])
        if "openvino" in e:
            v = e["openvino"]["parity"]
            shipped = e["openvino"].get("shipped", True)
            rows.append([a.label, f"{code(e['openvino']['xml'])} + {code(e['openvino']['bin'])}"
                         + ("" if shipped else " (not shipped)"),
                         f"{code(e['file'])} (onnxruntime)", f"agreement ≥ {v['min_argmax_agreement']:.2%}"
                         + (_accuracy_gate(v["accuracy_check"]) if "accuracy_check" in v else "")
                         + f" ({v['device']}, {', '.join(f'{k_} {v_}' for k_, v_ in v['config'].items())})",
                         f"{v['max_abs_logit_diff']:.2e}", f"{v['argmax_agreement']:.2%}", _verdict(v), "—"])
        if "mobile_usability" in e:
            u = e["mobile_usability"]
            eps = u["execution_providers"]
            mobile.append((a.label, code(e["file"]), eps, u["recommendation"]))
    notes = []
    edge = metrics.get("edge")
    if edge is not None and not edge.get("formats"):
        notes.append(f"Edge formats: none ({code('export.edge_formats')} is empty).")
    if edge and "ort" in edge:
        o = edge["ort"]
        diffs = [e["ort"]["parity"].get("max_abs_logit_diff_vs_default_session") for r, e in metrics.items()
                 if r in ARTIFACTS and "ort" in e]
        diffs = [d for d in diffs if d is not None]
        setting = ", ".join(f"{code(k_)} = {v_}" for k_, v_ in o["session_config"].items())
        notes.append(f"ORT format: optimization style {o['optimization_style']}, target platform {o['target_platform']}. "
                     f"Load with the session option {setting} so that onnxruntime replays the saved optimizations "
                     "(without it an int8 file runs its QDQ graph in float and its logits differ). "
                     f"{code(o['required_operators_config'])} lists the operators a reduced onnxruntime build needs. "
                     "The bitwise check runs the ONNX file with the optimizations the conversion keeps (basic and "
                     "extended, no layout rewrites); the ONNX file in a default session, whose layout rewrites pick "
                     "other convolution kernels, differs from it"
                     + (f" by at most {max(diffs):.2e} in a logit." if diffs else "."))
    if edge and "openvino" in edge and not edge["openvino"].get("available"):
        notes.append(f"OpenVINO IR: not written ({edge['openvino'].get('reason', 'openvino unavailable')}).")
    tables = [("Parity of the shipped files (whole test split)", EXPORT_HEAD, rows, notes)]
    if mobile:
        names = list(dict.fromkeys(ep for _, _, eps, _ in mobile for ep in eps))
        tables.append(("Mobile usability (onnxruntime's checker: NNAPI and CoreML partitions)",
                       ["model", "file", *names, "recommendation"],
                       [[label, f, *[_usability(eps.get(n, {})) for n in names], advice] for label, f, eps, advice in mobile],
                       []))
    return tables


STAGE_HEAD = ["stage", "status", "seconds", "model", "weights kept", "test accuracy (PyTorch)", "fingerprint"]


def _kept(m: dict) -> str:
    """Which epoch's weights a training stage kept, and their validation accuracy."""
    rows = m.get("steps") if isinstance(m.get("steps"), list) else [m]
    parts = []
    for r in rows:
        if not isinstance(r, dict) or not r.get("selected_epoch"):
            continue
        history = r.get("history") if isinstance(r.get("history"), list) else None
        epochs = history[-1].get("epoch") if history and isinstance(history[-1], dict) else None
        parts.append(f"epoch {r['selected_epoch']}" + (f"/{epochs}" if epochs else "")
                     + (" (moving average)" if r.get("ema") else "")
                     + (f", val {r['selected_val_accuracy']:.4f}" if r.get("selected_val_accuracy") is not None else ""))
    return "; ".join(parts)


def _accuracy_gate(acc: dict) -> str:
    """The INT8 OpenVINO gate's accuracy part, with its measured figures."""
    return (f"; accuracy {acc['accuracy']:.4f} no worse than {acc['reference_accuracy']:.4f} within chance "
            f"(right only in onnxruntime {acc['right_only_in_reference']}, only here {acc['right_only_here']}, "
            f"net allowed {acc['max_net_images_lost']:.1f})")


def stage_rows(ctx: RunContext) -> list[list[str]]:
    out = []
    for n, r in ctx.results.items():
        m = r.metrics
        acc = m.get("test_accuracy")
        out.append([n, "skipped (unchanged)" if r.skipped else "ran", f"{m.get('stage_seconds', 0):.1f}",
                    str(m.get("model", "")), _kept(m), "" if acc is None else f"{acc:.4f}", r.fingerprint[:12]])
    return out


def plots(ctx: RunContext, rows: list[dict]) -> list[tuple[bytes, str]]:
    """Accuracy and size of every model, and latency per setting when the bench stage ran."""
    from compress.html import figure_png, pyplot

    plt = pyplot()
    labels = [r["label"] for r in rows]
    figs = []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    acc = [r["onnx_accuracy"] if r["onnx_accuracy"] is not None else (r["torch_accuracy"] or 0.0) for r in rows]
    a1.bar(labels, acc, color="#4c72b0")
    lo = min(acc) if acc else 0.0
    a1.set_ylim(max(0.0, lo - 0.05), 1.0)
    a1.set_ylabel("test accuracy")
    a1.set_title("accuracy (ONNX when exported)")
    sizes = [(r["onnx_size_bytes"] or 0) / 1e6 for r in rows]
    a2.bar(labels, sizes, color="#dd8452")
    a2.set_ylabel("MB")
    a2.set_title("ONNX file size")
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=20, labelsize=8)
    figs.append((figure_png(fig), "accuracy and file size per model"))
    settings = list(dict.fromkeys((x["image_size"], x["threads_setting"]) for r in rows for x in r["latency"]))
    if settings:
        fig, ax = plt.subplots(figsize=(11, 3.8))
        width = 0.8 / len(settings)
        for j, (size, setting) in enumerate(settings):
            vals = [next((x["p50_ms"] for x in r["latency"] if (x["image_size"], x["threads_setting"]) == (size, setting)), 0.0)
                    for r in rows]
            ax.bar([i + j * width for i in range(len(rows))], vals, width, label=f"{size}×{size}, {setting}")
        ax.set_xticks([i + width * (len(settings) - 1) / 2 for i in range(len(rows))], labels, rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("p50 latency, ms (log)")
        ax.set_title("onnxruntime CPU latency, batch 1")
        ax.legend(fontsize=8)
        figs.append((figure_png(fig), "latency per model and setting"))
    return figs


def html_report(ctx: RunContext, rows: list[dict], extra: list[str] | None = None) -> str:
    from compress import html as H

    d = ctx.data.describe()
    ship = headline(ctx, rows, code=lambda t: f"\x00{t}\x01")
    body = []
    if ship:
        def marked(text: str) -> str:  # file and model names in <code>, the rest escaped
            return H.esc(text).replace("\x00", "<code>").replace("\x01", "</code>")

        body.append("<div class='headline'>" + f"<p><b>{marked(ship[0])}</b></p>"
                    + "".join(f"<p class='{'warning' if t.startswith('Warning') else 'note'}'>{marked(t)}</p>"
                              for t in ship[1:]) + "</div>")
    body += [f"<p class='note'>Dataset <b>{H.esc(d['dataset'])}</b> ({d['num_classes']} classes; train/val/test "
            f"{d['sizes']['train']}/{d['sizes']['val']}/{d['sizes']['test']} at {d['image_size']}×{d['image_size']}). "
            "Accuracy is on the test split.</p>"]
    body += [f"<p class='note'>{H.esc(n)}</p>" for n in data_notes(d)]
    if ctx.derived:
        body.append("<p class='note'>Derived from the data: "
                    + H.esc("; ".join(describe_derived(ctx.derived))) + ".</p>")
    if "distill" in ctx.results:
        body.append(f"<p class='note'>{H.esc(method_line(ctx.results['distill'].metrics))}</p>")
    if rows:
        head, table = main_table(ctx, rows)
        body += ["<h2>Teacher vs student</h2>", H.table(head, [[label, *cells] for label, cells in table])]
        body += [H.img(png, cap, cap) for png, cap in plots(ctx, rows)]
    if "export" in ctx.results:
        for title, head, table, notes in export_tables(ctx.results["export"].metrics):
            body += [f"<h2>{H.esc(title)}</h2>", H.table(head, table)]
            body += [f"<p class='note'>{H.esc(n)}</p>" for n in notes]
    body += extra or []
    body += ["<h2>Stages</h2>", H.table(STAGE_HEAD, stage_rows(ctx))]
    body += ["<h2>Lineage</h2>", H.table(["", ""], [[k, v] for k, v in lineage(ctx).items()])]
    return H.page(f"compress run {ctx.cfg.name}", body)


def _fmt_setting(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def tuning_markdown(record: dict) -> list[str]:
    """The chosen settings and every trial, as Markdown."""
    lines = ["## Tuning on the validation split", "",
             "| setting | recipe | chosen |", "|---|---|---|"]
    for study in record["studies"]:
        for k, v in study["best_params"].items():
            lines.append(f"| `{k}` | {_fmt_setting(study['baseline'].get(k))} | {_fmt_setting(v)} |")
    for study in record["studies"]:
        keys = list(study["best_params"])
        lines += ["", f"Study `{study['study']}` ({study['study_name']}): best validation accuracy "
                      f"{study['best_value']:.4f} in trial {study['best_trial']}, {len(study['trials'])} trials, "
                      f"{study['seconds']:.0f} s.", "",
                  "| trial | state | validation accuracy | epochs | seconds | " + " | ".join(keys) + " |",
                  "|" + "---|" * (5 + len(keys))]
        for r in study["trials"]:
            value = "—" if r["value"] is None else f"{r['value']:.4f}"
            lines.append(f"| {r['number']} | {r['state']} | {value} | {r['last_epoch'] or '—'} | "
                         f"{r['seconds'] or 0:.0f} | " + " | ".join(_fmt_setting(r["params"].get(k, "—")) for k in keys) + " |")
    return lines


def tuning_plot(record: dict) -> bytes:
    """Optimization history: each trial's validation accuracy and the best so far, per study."""
    from compress.html import figure_png, pyplot

    plt = pyplot()
    studies = record["studies"]
    fig, axes = plt.subplots(1, len(studies), figsize=(5.5 * len(studies), 3.6), squeeze=False)
    for ax, study in zip(axes[0], studies):
        rows = [r for r in study["trials"] if r["value"] is not None]
        xs = [r["number"] for r in rows]
        ys = [r["value"] for r in rows]
        ax.scatter(xs, ys, s=18, color="#4c72b0", label="trial")
        best, line = float("-inf"), []
        for y in ys:
            best = max(best, y)
            line.append(best)
        ax.step(xs, line, where="post", color="#dd8452", label="best so far")
        pruned = [r["number"] for r in study["trials"] if r["state"] == "pruned"]
        if pruned:
            ax.scatter(pruned, [min(ys or [0.0])] * len(pruned), marker="x", color="#999999", label="stopped early")
        ax.set_title(f"{study['study']}: optimization history")
        ax.set_xlabel("trial")
        ax.set_ylabel("validation accuracy")
        ax.legend(fontsize=8)
    return figure_png(fig)


def write_reports(ctx: RunContext, tuning: dict | None = None) -> None:
    """summary.json, report.md and report.html of a run; ``tuning``: the record of the search that
    chose its settings (``compress.tune``), shown with its trials and history."""
    s = summary(ctx)
    md = markdown(ctx, s["table"])
    extra = None
    if tuning:
        from compress import html as H

        s["tuning"] = tuning
        lines = tuning_markdown(tuning)
        md = md.replace("\n## Stages\n", "\n" + "\n".join(lines) + "\n\n## Stages\n", 1)
        extra = [_lines_html(lines), H.img(tuning_plot(tuning), "optimization history", "optimization history")]
    write_json(ctx.run_dir / "summary.json", s)
    write_text(ctx.run_dir / "report.md", md)
    write_text(ctx.run_dir / "report.html", html_report(ctx, s["table"], extra))


def _lines_html(lines: list[str]) -> str:
    """The tuning section's Markdown (a heading, paragraphs and pipe tables) as HTML."""
    from compress import html as H

    out, table = [], []

    def flush():
        if table:
            rows = [[c.strip().strip("`") for c in r.strip("|").split("|")] for r in table if not set(r) <= set("|-")]
            out.append(H.table(rows[0], rows[1:]))
            table.clear()

    for line in lines:
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h2>{H.esc(line[3:])}</h2>")
        elif line:
            out.append(f"<p class='note'>{H.esc(line.replace('`', ''))}</p>")
    flush()
    return "".join(out)
