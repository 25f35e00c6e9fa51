"""Stage ``export``: the ONNX files a run ships (the artifact table, ``compress.artifacts``), each
checked before it is kept.

Reads: the checkpoints of ``teacher``, ``distill``, ``prune`` and ``quantize`` (whichever ran).
Writes: ``teacher_fp32.onnx``, ``model_fp32.onnx``, ``model_pruned_fp32.onnx`` (with prune),
``model_int8.onnx`` (QAT, with quantize) and ``model_int8_ptq.onnx`` (onnxruntime's PTQ baseline), each
with deployer metadata; ``metrics.json`` holds each file's parity against its PyTorch model (FP32:
max |Δlogit| and argmax agreement on the whole test split; INT8: agreement with the fake-quant model)
and the kernels onnxruntime runs for the int8 files (every convolution must be an int8 kernel)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from compress import artifacts as A
from compress import qat
from compress.context import RunContext
from compress.data import calibration_array
from compress.errors import CompressError
from compress.evaluate import onnx_accuracy
from compress.export import export_onnx, parity, update_metadata
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
    limit = ctx.cfg.quantize.calibration_images if size == ctx.data.image_size else 64
    qat.ptq_static(fp32_path, path, calibration_array(ctx.data.train, size, limit))
    return None


@register("export")
def run(ctx: RunContext, out: Path, work: Path) -> dict:
    data = ctx.data
    result: dict = {}
    fp32_file = A.fp32_student(ctx.cfg.stages).file
    for artifact in A.for_run(ctx.cfg.stages, ctx.cfg.quantize.ptq_baseline):
        path = out / artifact.file
        model = build_onnx(ctx, artifact, data.image_size, path, fp32_path=out / fp32_file)
        entry = {"file": artifact.file, "opset": ctx.cfg.export.opset, **_check(ctx, artifact, model, path)}
        update_metadata(path, _metadata(ctx, artifact, entry["onnx_accuracy"]))
        p = entry.get("parity")
        log.info(f"[export] {artifact.file}: " + (f"max |Δlogit| {p['max_abs_logit_diff']:.2e}, agreement "
                                                  f"{p['argmax_agreement']:.2%}, " if p else "")
                 + f"onnx accuracy {entry['onnx_accuracy']:.4f}")
        entry["size_bytes"] = path.stat().st_size
        entry["onnx_accuracy"] = entry.pop("onnx_accuracy")  # keeps the key order of metrics.json
        result[artifact.role] = entry
    return result


def _check(ctx: RunContext, artifact: A.Artifact, model: torch.nn.Module | None, path: Path) -> dict:
    """The gates a file must pass: FP32 files match their PyTorch model within the export tolerances;
    int8 files run every convolution as an int8 kernel and agree with the fake-quant model."""
    cfg, test = ctx.cfg.export, ctx.data.test
    if artifact.precision == "fp32":
        p = parity(model, path, test, cfg.max_abs_logit_diff, cfg.min_argmax_agreement, rtol=cfg.logit_rtol)
        return {"parity": p, "onnx_accuracy": p["onnx_accuracy"]}
    entry: dict = {"kernels": qat.kernel_report(path)}
    if entry["kernels"]["float_convolutions"]:
        raise CompressError(f"{artifact.file}: onnxruntime runs {entry['kernels']['float_convolutions']} "
                            "convolutions in float; the int8 graph is not fused")
    if artifact.has_torch_twin:
        entry["parity"] = parity(model, path, test, max_abs_diff=float("inf"), min_agreement=cfg.int8_min_argmax_agreement)
        entry["onnx_accuracy"] = entry["parity"]["onnx_accuracy"]
    else:
        entry["onnx_accuracy"] = onnx_accuracy(path, test)
    return entry


def _metadata(ctx: RunContext, artifact: A.Artifact, onnx_accuracy: float) -> dict:
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
        props["compress.quantization"] = {**qat.SCHEME, "method": "quantization-aware training"}
    elif artifact.made_by == "ptq":
        props["compress.quantization"] = {**qat.SCHEME, "method": "onnxruntime quantize_static (min/max calibration)",
                                          "bias": "int32"}
    return props
