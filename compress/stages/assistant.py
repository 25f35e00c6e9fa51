"""Stage ``assistant``: the teacher assistant of ``distill.method: ta`` (Mirzadeh et al. 2020), added to
the stages by itself before distill.

Reads: ``teacher/model.safetensors``.
Writes: ``model.safetensors`` + ``model.json``, the assistant (``distill.params.assistant``) distilled
from the teacher with Hinton KD and the distill stage's training settings; the student is then
distilled from it."""

from __future__ import annotations

from pathlib import Path

from compress.context import RunContext
from compress.distill import HintonKD, logit_objective
from compress.models import create_model, save_checkpoint
from compress.stages import register
from compress.stages.common import MODEL_FILE, load_stage_model, model_meta, review
from compress.train import fit, seed_everything


def config(ctx: RunContext) -> dict:
    """The assistant's name and the distill section's training settings (not the student's name)."""
    d = ctx.cfg.distill
    train = {k: v for k, v in d.model_dump(mode="json").items() if k not in ("student", "method", "params")}
    return {"assistant": d.method_params().assistant, **train}


@register("assistant", config=config)
def run(ctx: RunContext, out: Path, work: Path) -> dict:
    cfg, data = ctx.cfg.distill, ctx.data
    name = cfg.method_params().assistant
    teacher = load_stage_model(ctx, "teacher")
    seed_everything(ctx.cfg.seed)
    model = create_model(name, data.num_classes)
    loss = HintonKD(alpha=cfg.alpha, temperature=cfg.temperature, label_smoothing=cfg.label_smoothing)
    result = fit(model, data.train, data.val, cfg, logit_objective(loss, model, teacher), work, seed=ctx.cfg.seed,
                 batch_size=ctx.cfg.data.batch_size, desc=f"assistant {name}")
    save_checkpoint(model, out / MODEL_FILE, {**model_meta(ctx, name, "assistant"),
                                              "teacher": ctx.metrics("teacher")["model"]})
    return {"model": name, **review(ctx, teacher, model), "history": result.history,
            "train_seconds": round(result.seconds, 2)}
