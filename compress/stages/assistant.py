"""Stage ``assistant``: the teacher assistant of ``distill.method: ta`` (Mirzadeh et al. 2020), added to
the stages by itself before distill.

Reads: ``teacher/model.safetensors``.
Writes: ``model.safetensors`` + ``model.json``, the assistant (``distill.params.assistant``) distilled
from the teacher with Hinton KD and the distill stage's training settings, starting from
``distill.assistant_pretrained`` weights when set; the student is then distilled from it."""

from __future__ import annotations

from pathlib import Path

from compress.context import RunContext
from compress.distill import HintonKD, logit_objective
from compress.models import create_model, save_checkpoint
from compress.stages import register
from compress.stages.common import (MODEL_FILE, load_stage_model, model_meta, pretrained_identity, pretrained_source,
                                    review)
from compress.train import fit, seed_everything


def config(ctx: RunContext) -> dict:
    """The assistant's name and starting weights and the distill section's training settings (not the
    student's, nor the teacher-output cache's: the assistant learns from the live teacher)."""
    d = ctx.cfg.distill
    student_only = ("student", "method", "params", "pretrained", "assistant_pretrained", "teacher_cache",
                    "teacher_cache_topk")
    train = {k: v for k, v in d.model_dump(mode="json").items() if k not in student_only}
    return {"assistant": d.method_params().assistant, "pretrained": d.assistant_pretrained, **train}


def identity(ctx: RunContext) -> dict:
    return pretrained_identity(ctx.cfg.distill.assistant_pretrained, "distill.assistant_pretrained")


def models(ctx: RunContext) -> list[tuple[str, str, bool | str]]:
    return [("assistant", ctx.cfg.distill.method_params().assistant, ctx.cfg.distill.assistant_pretrained)]


@register("assistant", config=config, identity=identity, models=models)
def run(ctx: RunContext, out: Path, work: Path) -> dict:
    cfg, data = ctx.cfg.distill, ctx.data
    name = cfg.method_params().assistant
    teacher = load_stage_model(ctx, "teacher")
    seed_everything(ctx.cfg.seed)
    model = create_model(name, data.num_classes, pretrained=cfg.assistant_pretrained)
    loss = HintonKD(alpha=cfg.alpha, temperature=cfg.temperature, label_smoothing=cfg.label_smoothing)
    result = fit(model, data.train, data.val, cfg, logit_objective(loss, model, teacher), work, seed=ctx.cfg.seed,
                 batch_size=ctx.cfg.data.batch_size, desc=f"assistant {name}")
    save_checkpoint(model, out / MODEL_FILE, {**model_meta(ctx, name, "assistant"),
                                              "teacher": ctx.metrics("teacher")["model"]})
    return {"model": name, "start": pretrained_source(cfg.assistant_pretrained), **review(ctx, teacher, model),
            "history": result.history,
            "train_seconds": round(result.seconds, 2)}
