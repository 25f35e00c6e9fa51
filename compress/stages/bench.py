"""Stage ``bench``: what each shipped file costs and how well it does.

Reads: the ONNX files of ``export`` (the artifact table) and the checkpoints whose architecture they
hold (for parameters and MACs).
Writes: ``metrics.json`` with, per file, onnxruntime CPU latency at batch 1 (mean, p50, p90, p99) per
input size and thread setting, file size, parameters, MACs per size, the file's own test accuracy and
the review's metrics against the teacher file. Latency is :func:`compress.bench.latency`: each setting
in a fresh process pinned to as many cores as threads (the first ones this process may use; the
"all cores" setting pins nothing), with the cores it ran on, whether it was pinned, the session's load
time and peak memory recorded beside the percentiles. Sizes other than the training size are measured
on copies rebuilt at that size (in the work folder)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from compress import artifacts as A
from compress import metrics as M
from compress.bench import file_size, latency
from compress.context import RunContext
from compress.evaluate import ort_predict, ort_session
from compress.stages import register
from compress.stages.common import load_stage_model
from compress.stages.export import build_onnx

log = logging.getLogger(__name__)


@register("bench")
def run(ctx: RunContext, out: Path, work: Path) -> dict:
    cfg, data = ctx.cfg.bench, ctx.data
    sizes = cfg.image_sizes or sorted({data.image_size, 224})
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"models": {}}
    teacher: dict = {}
    for artifact in A.for_run(ctx.cfg.stages, ctx.cfg.export.ptq_baseline):
        stage = A.architecture_stage(artifact, ctx.cfg.stages)
        model = load_stage_model(ctx, stage)
        path = ctx.stage_dir("export") / artifact.file
        logits, targets = ort_predict(ort_session(path), data.test)
        row: dict = {
            "model": ctx.metrics(stage)["model"],
            "file": artifact.file,
            "precision": artifact.precision,
            "size_bytes": file_size(path),
            "params": M.count_params(model),
            "onnx_accuracy": M.accuracy(logits, targets),
            "macs": {},
            "latency": [],
        }
        if artifact.role == "teacher":
            teacher = {"logits": torch.from_numpy(logits), "params": row["params"]}
        else:
            row["review"] = M.review_metrics(teacher["logits"], torch.from_numpy(logits), torch.from_numpy(targets),
                                             teacher["params"], row["params"])
        for size in sizes:
            row["macs"][str(size)] = M.count_macs(model, size)
            row["latency"] += _latencies(ctx, artifact, size, work, row["model"])
        result["models"][artifact.role] = row
    return result


def _latencies(ctx: RunContext, artifact: A.Artifact, size: int, work: Path, model_name: str) -> list[dict]:
    """Latency of ``artifact`` at input ``size`` for each thread setting of the recipe."""
    cfg = ctx.cfg.bench
    path = ctx.stage_dir("export") / artifact.file
    if size != ctx.data.image_size:  # the artifact has a fixed spatial size; benchmark a copy at this one
        path = work / f"{artifact.role}_{size}.onnx"
        fp32 = A.fp32_student(ctx.cfg.stages)
        build_onnx(ctx, artifact, size, path, fp32_path=work / f"{fp32.role}_{size}.onnx")
    out = []
    for threads in cfg.threads:
        lat = latency(path, size, threads=threads, warmup=cfg.warmup, runs=cfg.runs)
        out.append(lat)
        where = f"pinned to cores {','.join(map(str, lat['cores']))}" if lat["pinned"] else "not pinned"
        log.info(f"[bench] {artifact.role} {model_name} {size}x{size} {lat['threads_setting']} ({where}): "
                 f"mean {lat['mean_ms']:.3f} ms, p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms")
    return out
