"""Stage ``quantize``: quantization-aware training of the student (``compress.qat``): BatchNorm folded,
int8 per-channel weights and uint8 activations fake-quantized, ranges calibrated on training images,
then trained with the KD loss against the FP32 teacher (``quantize.distill``; its logits read through
distill's teacher-output cache entry when ``distill.teacher_cache`` is on) under the schedule that
freezes observers and BatchNorm statistics.

Reads: ``prune/model.safetensors`` when pruning runs, else ``distill/model.safetensors``;
``teacher/model.safetensors``.
Writes: ``model.safetensors`` + ``model.json`` of the fake-quant model (``qat: true``, the scheme, and
the pruned architecture when there is one)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from compress import metrics as M
from compress import qat
from compress.artifacts import student_stage
from compress.context import RunContext
from compress.data import without_augmentation
from compress.distill import HintonKD, logit_objective
from compress.evaluate import loader, predict
from compress.fsio import read_json
from compress.models import save_checkpoint
from compress.stages import register
from compress.stages.common import MODEL_FILE, kd_teacher_cache, load_stage_model, model_meta, teacher_cache_setting
from compress.train import fit, seed_everything

log = logging.getLogger(__name__)


def probe(ctx: RunContext, student: torch.nn.Module) -> torch.nn.Module:
    """Rewrite ``student`` into its fake-quant form on a tiny input, calibrate it on noise, and run a
    training step's forward and backward and an inference forward with fake quantization on."""
    size, n = ctx.data.image_size, ctx.data.num_classes
    gm = qat.prepare_qat(student, torch.zeros(1, 3, size, size), float_stem=ctx.cfg.quantize.float_stem,
                         weight_bits=ctx.cfg.quantize.resolved_weight_bits())
    qat.calibrate(gm, [torch.randn(2, 3, size, size)])
    qat.qat_schedule(gm, 0, ctx.cfg.quantize.freeze_observers_after, ctx.cfg.quantize.freeze_bn_after)
    gm.train()
    gm(torch.randn(2, 3, size, size)).sum().backward()
    gm.eval()
    with torch.no_grad():
        out = gm(torch.randn(1, 3, size, size))
    if tuple(out.shape) != (1, n):
        raise RuntimeError(f"the fake-quant model returns shape {tuple(out.shape)}, not (1, {n})")
    return student


def identity(ctx: RunContext) -> dict:
    """The teacher-output cache setting, and the weight width ``auto`` resolved to on this machine."""
    return {**teacher_cache_setting(ctx), "weight_bits": ctx.cfg.quantize.resolved_weight_bits()}


@register("quantize", identity=identity, probe=probe, probe_does="quantized")
def run(ctx: RunContext, out: Path, work: Path) -> dict:
    cfg, data = ctx.cfg.quantize, ctx.data
    source = student_stage(ctx.cfg.stages)
    student = load_stage_model(ctx, source)
    name = ctx.metrics("distill")["model"]
    seed_everything(ctx.cfg.seed)
    bits = cfg.resolved_weight_bits()
    gm = qat.prepare_qat(student, torch.zeros(1, 3, data.image_size, data.image_size), float_stem=cfg.float_stem,
                         weight_bits=bits)
    calib_ds = data.train
    if cfg.calibration_images < len(calib_ds):
        calib_ds = torch.utils.data.Subset(calib_ds, list(range(cfg.calibration_images)))
    seen = qat.calibrate(gm, (x for x, _ in loader(without_augmentation(calib_ds), 128)))
    teacher = load_stage_model(ctx, "teacher") if cfg.distill else None
    loss = HintonKD(alpha=cfg.alpha if cfg.distill else 0.0, temperature=cfg.temperature,
                    label_smoothing=cfg.label_smoothing)
    qat.qat_schedule(gm, 0, cfg.freeze_observers_after, cfg.freeze_bn_after)
    before_logits, targets = predict(gm, data.test)
    objective = logit_objective(loss, gm, teacher)
    cache = kd_teacher_cache(ctx, objective, cfg, ctx.cfg.seed)
    result = fit(gm, data.train, data.val, cfg, objective, work, seed=ctx.cfg.seed,
                 batch_size=ctx.cfg.data.batch_size, desc=f"qat {name}",
                 on_epoch_start=lambda e: qat.qat_schedule(gm, e, cfg.freeze_observers_after, cfg.freeze_bn_after))
    if cache is not None:
        log.info(f"[quantize] {cache.summary()}")
    qat.qat_schedule(gm, 10**9, cfg.freeze_observers_after, cfg.freeze_bn_after)  # final state: all frozen
    gm.eval()
    meta = {**model_meta(ctx, name, "student_int8"), "qat": True, "scheme": qat.SCHEME, "float_stem": cfg.float_stem,
            "weight_bits": bits}
    if source == "prune":
        meta["arch"] = read_json(ctx.stage_dir("prune") / "model.json")["arch"]
    save_checkpoint(gm, out / MODEL_FILE, meta)
    logits, _ = predict(gm, data.test)
    return {
        "model": name,
        "scheme": qat.SCHEME,
        "weight_bits": bits,
        "graph": qat.qat_summary(gm),
        "calibration_images": seen,
        "loss": "kd" if cfg.distill else "ce",
        "fake_quant_accuracy_before_qat": M.accuracy(before_logits, targets),
        "test_accuracy": M.accuracy(logits, targets),
        "fp32_accuracy": ctx.metrics(source)["test_accuracy"],
        "from_stage": source,
        "history": result.history,
        **result.selection(),
        "derived": ctx.derived.get("quantize"),
        "teacher_cache": {"key": cache.key, **cache.stats} if cache is not None else None,
        "train_seconds": round(result.seconds, 2),
    }
