"""Stage ``export``: the ONNX files a run ships (the artifact table, ``compress.artifacts``) and, beside
each student file, what edge apps load; every file is checked before it is kept.

Reads: the checkpoints of ``teacher``, ``distill``, ``prune`` and ``quantize`` (whichever ran).
Writes: ``teacher_fp32.onnx``, ``model_fp32.onnx``, ``model_pruned_fp32.onnx`` (with prune),
``model_int8.onnx`` (QAT, with quantize) and ``model_int8_ptq.onnx`` (onnxruntime's PTQ baseline), each
with deployer metadata; for every student file (``export.edge_formats``) its ORT format file
(``<name>.ort``, saved runtime optimizations, with ``required_operators.with_runtime_opt.config`` for a
reduced onnxruntime build) and its OpenVINO IR (``<name>.xml`` and ``<name>.bin``, when openvino is
installed). ``metrics.json`` holds each file's parity with its tolerance: FP32 ONNX against its
PyTorch model (max |Δlogit| and argmax agreement on the whole test split), INT8 ONNX against the
fake-quant model, ORT format against its ONNX file (bitwise identical), OpenVINO IR against its ONNX
file (argmax agreement); the kernels onnxruntime runs for the int8 files (every convolution must be
an int8 kernel); and onnxruntime's mobile usability verdict (NNAPI, CoreML) per student file. A
failed check stops the stage and leaves its message, with the numbers, in ``run.log``; an OpenVINO IR
that fails its gate alone is not shipped (``<run>/rejected/`` keeps it) and the stage goes on."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from compress import artifacts as A
from compress import edge_formats as E
from compress import qat
from compress.context import RunContext
from compress.data import calibration_array
from compress.errors import CheckFailed, CompressError
from compress.evaluate import onnx_accuracy, ort_predict, ort_session
from compress.export import export_onnx, parity, update_metadata
from compress.fsio import write_json
from compress.logs import FILE_ONLY
from compress.stages import register
from compress.stages.common import MODEL_FILE, load_stage_model

log = logging.getLogger(__name__)


def build_onnx(ctx: RunContext, artifact: A.Artifact, size: int, path: Path,
               fp32_path: Path | None = None) -> torch.nn.Module | None:
    """Write ``artifact``'s ONNX file at input ``size``; returns the PyTorch model it must match (None
    for the PTQ file, which is made from ``fp32_path``)."""
    opset = ctx.cfg.export.opset
    if artifact.made_by == "fp32":
        model = load_stage_model(ctx, artifact.stage)
        export_onnx(model, path, size, opset=opset)
        return model
    if artifact.made_by == "qat":
        model = qat.load_qat_checkpoint(ctx.stage_dir(artifact.stage) / MODEL_FILE)[0]
        qat.export_qdq(model, path, size, opset=opset)
        return model
    if fp32_path is None:
        raise CompressError("PTQ needs the FP32 ONNX file")
    limit = ctx.cfg.export.ptq_calibration_images if size == ctx.data.image_size else 64
    qat.ptq_static(fp32_path, path, calibration_array(ctx.data.train, size, limit),
                   reduce_range=ctx.cfg.quantize.resolved_weight_bits() == 7)
    return None


@register("export")
def run(ctx: RunContext, out: Path, work: Path) -> dict:
    try:
        return _export(ctx, out, work)
    except CompressError as e:
        # the console gets the CLI's one line; run.log keeps which check failed, with its numbers
        log.error(f"[export] failed: {e}", extra={FILE_ONLY: True})
        raise


def _export(ctx: RunContext, out: Path, work: Path) -> dict:
    data = ctx.data
    result: dict = {}
    fp32_file = A.fp32_student(ctx.cfg.stages).file
    shipped = A.for_run(ctx.cfg.stages, ctx.cfg.export.ptq_baseline)
    for artifact in shipped:
        path = out / artifact.file
        model = build_onnx(ctx, artifact, data.image_size, path, fp32_path=out / fp32_file)
        try:
            checked = _check(ctx, artifact, model, path)
        except CompressError as e:
            set_aside(ctx, path, e)
            raise
        entry = {"file": artifact.file, "opset": ctx.cfg.export.opset, **checked}
        update_metadata(path, _metadata(ctx, artifact, entry["onnx_accuracy"],
                                        float_stem=entry.get("kernels", {}).get("float_convolutions", 0) > 0))
        p = entry.get("parity")
        log.info(f"[export] {artifact.file}: " + (f"max |Δlogit| {p['max_abs_logit_diff']:.2e}, agreement "
                                                  f"{p['argmax_agreement']:.2%}, " if p else "")
                 + f"onnx accuracy {entry['onnx_accuracy']:.4f}")
        entry["size_bytes"] = path.stat().st_size
        entry["onnx_accuracy"] = entry.pop("onnx_accuracy")  # keeps the key order of metrics.json
        result[artifact.role] = entry
    if ctx.cfg.export.edge_formats:
        result["edge"] = edge_files(ctx, [a for a in shipped if a.stage != "teacher"], out, work, result)
    return result


def edge_files(ctx: RunContext, artifacts: list[A.Artifact], out: Path, work: Path, result: dict) -> dict:
    """Beside each of ``artifacts``' ONNX files in ``out``, the edge formats of ``export.edge_formats``,
    each checked against its ONNX file; adds ``ort``, ``mobile_usability`` and ``openvino`` to the
    file's entry in ``result`` and returns what holds for all of them."""
    cfg, test = ctx.cfg.export, ctx.data.test
    onnx = {a.role: out / a.file for a in artifacts}
    summary: dict = {"formats": list(cfg.edge_formats)}
    if "openvino" in cfg.edge_formats:
        summary["openvino"] = status = E.openvino_status()
        if not status["available"]:
            log.warning(f"[export] no OpenVINO IR written: {status['reason']}")
    openvino = summary.get("openvino", {}).get("available", False)
    # each ONNX file's logits in the session parity and bench use: the reference of the OpenVINO IR
    logits = {}
    if openvino or "ort" in cfg.edge_formats:
        logits = {role: ort_predict(ort_session(path), test)[0] for role, path in onnx.items()}
    if "ort" in cfg.edge_formats:
        converted = E.to_ort(list(onnx.values()), out, work)
        summary["ort"] = {"optimization_style": E.ORT_OPTIMIZATION_STYLE, "target_platform": E.ORT_TARGET_PLATFORM,
                          "session_config": E.ORT_SESSION_CONFIG,
                          "required_operators_config": converted["required_operators_config"]}
        for a in artifacts:
            name = converted["files"][a.file]
            p = E.ort_parity(out / name, onnx[a.role], test, logits[a.role])
            result[a.role]["ort"] = {"file": name, "size_bytes": (out / name).stat().st_size, "parity": p}
            log.info(f"[export] {name}: logits identical to {a.file} ({p['images']} images; max |Δlogit| "
                     f"{p['max_abs_logit_diff_vs_default_session']:.2e} against its default session)")
            usability = E.mobile_usability(onnx[a.role])
            result[a.role]["mobile_usability"] = usability
            log.info(f"[export] {a.file} on mobile: {usability['recommendation']}")
    for a in artifacts if openvino else []:
        ir = E.to_openvino(onnx[a.role], out, work)
        limit = cfg.min_argmax_agreement if a.precision == "fp32" else cfg.openvino_int8_min_argmax_agreement
        p = E.openvino_parity(out / ir["xml"], onnx[a.role], test, limit, logits[a.role],
                              accuracy_gate=a.precision != "fp32")
        if not p["passed"]:
            # OpenVINO computes int8 with its own kernels: an IR that disagrees is set aside, the rest ships
            log.warning(f"[export] {p['reason']}")
            set_aside(ctx, out / ir["xml"], CheckFailed(p["reason"], details=p), also=(out / ir["bin"],))
            for name in (ir["xml"], ir["bin"]):
                (out / name).unlink()
            result[a.role]["openvino"] = {**ir, "shipped": False, "parity": p}
            continue
        result[a.role]["openvino"] = {**ir, "shipped": True, "parity": p}
        acc = p.get("accuracy_check")
        log.info(f"[export] {ir['xml']}: agreement {p['argmax_agreement']:.2%} with {a.file} (limit {limit:.2%}), "
                 f"max |Δlogit| {p['max_abs_logit_diff']:.2e}"
                 + (f"; accuracy {acc['accuracy']:.4f} against {acc['reference_accuracy']:.4f}" if acc else ""))
    return summary


REJECTED = "rejected"


def set_aside(ctx: RunContext, path: Path, error: CompressError, also: tuple[Path, ...] = ()) -> Path:
    """Keep a file that failed its gate, with the files it needs (``also``: an OpenVINO IR's ``.bin``),
    in ``<run>/rejected/`` (not shipped, not deleted) beside a JSON record of why, with the check's
    numbers; returns where it went."""
    folder = ctx.run_dir / REJECTED
    folder.mkdir(parents=True, exist_ok=True)
    kept = folder / path.name
    for f in (*also, path):
        shutil.copyfile(f, folder / f.name)
    write_json(folder / f"{path.name}.json", {"file": path.name, "reason": str(error),
                                              "details": getattr(error, "details", {})})
    log.warning(f"[export] {path.name} failed its check and is not shipped; kept in {kept} with the numbers")
    return kept


def _check(ctx: RunContext, artifact: A.Artifact, model: torch.nn.Module | None, path: Path) -> dict:
    """The gates a file must pass: FP32 files match their PyTorch model within the export tolerances;
    int8 files run every convolution as an int8 kernel and agree with the fake-quant model."""
    cfg, test = ctx.cfg.export, ctx.data.test
    if artifact.precision == "fp32":
        p = parity(model, path, test, cfg.max_abs_logit_diff, cfg.min_argmax_agreement, rtol=cfg.logit_rtol,
                   float64_factor=cfg.float64_factor)
        return {"parity": p, "onnx_accuracy": p["onnx_accuracy"]}
    entry: dict = {"kernels": qat.kernel_report(path)}
    kernels = entry["kernels"]
    stem = qat.qat_summary(model)["float_convolutions"] if artifact.made_by == "qat" else 0
    # onnxruntime's own PTQ file (the baseline) is held to its convolutions only: what else it leaves in
    # float (a squeeze-excite's ReduceMean) is recorded in the kernel report, not refused
    between = kernels["float_ops_between_int8"] if artifact.made_by == "qat" else {}
    if kernels["float_convolutions"] != stem or between:
        floats = ", ".join(f"{n} {op}" for op, n in between.items()) or "none"
        raise CompressError(f"{artifact.file}: onnxruntime runs {kernels['float_convolutions']} convolutions in "
                            f"float (the float stem has {stem}) and these float operations between int8 kernels: "
                            f"{floats}; the int8 graph is not fused")
    if artifact.has_torch_twin:
        entry["parity"] = parity(model, path, test, max_abs_diff=float("inf"), min_agreement=cfg.int8_min_argmax_agreement)
        entry["onnx_accuracy"] = entry["parity"]["onnx_accuracy"]
    else:
        entry["onnx_accuracy"] = onnx_accuracy(path, test)
    return entry


def _metadata(ctx: RunContext, artifact: A.Artifact, onnx_accuracy: float, float_stem: bool = False) -> dict:
    """``metadata_props`` for the deployer: the input, the classes, the models, the scheme."""
    data, distill = ctx.data, ctx.metrics("distill")
    props = {
        "compress.role": artifact.role,
        "compress.input_size": [1, 3, data.image_size, data.image_size],
        "compress.input_layout": "NCHW float32, (x - mean) / std per channel" if data.name != "digits"
        else "NCHW float32; digits' 0..16 gray levels scaled to 0..1, copied to 3 channels, then (x - mean) / std",
        "compress.mean": list(data.mean),
        "compress.std": list(data.std),
        "compress.resize": {"interpolation": data.interpolation, "crop_pct": data.crop_pct,
                            "note": "resize the shorter side to input/crop_pct, then centre-crop the input size"}
        if data.name.startswith("imagefolder:") else {"interpolation": data.interpolation},
        "compress.class_names": data.class_names,
        "compress.model": distill["teacher"] if artifact.stage == "teacher" else distill["model"],
        "compress.pruned": A.architecture_stage(artifact, ctx.cfg.stages) == "prune",
        "compress.teacher": distill["teacher"],
        "compress.student": distill["model"],
        "compress.dataset": data.name,
        "compress.accuracy": round(onnx_accuracy, 6),
        "compress.distillation_factor": round(distill["distillation_factor"], 4),
        "compress.precision": artifact.precision,
    }
    if artifact.made_by == "qat":
        props["compress.quantization"] = {**qat.SCHEME, "method": "quantization-aware training",
                                          "weight_bits": ctx.metrics("quantize").get("weight_bits", 8),
                                          "first_convolution": "float, quantized after its activation"
                                          if float_stem else "int8"}
    elif artifact.made_by == "ptq":
        props["compress.quantization"] = {**qat.SCHEME, "method": "onnxruntime quantize_static (min/max calibration)",
                                          "weight_bits": ctx.cfg.quantize.resolved_weight_bits(),
                                          "bias": "int32"}
    return props
