"""Stage ``distill``: the student trained with the recipe's distillation method (``distill.method``),
starting from ``distill.pretrained`` weights when set (published ones, or a local file; peers of
mutual learning start from scratch).

Reads: ``teacher/model.safetensors`` (and ``teacher/teachers/*`` for multi-teacher KD, or
``assistant/model.safetensors`` for ``ta``).
Writes: ``model.safetensors`` + ``model.json`` of the student (with ``dml``, the peer best on the
validation split), and the review's metrics against the teacher (eqs. 6-9) in ``metrics.json``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from compress import metrics as M
from compress.context import RunContext
from compress.distill import METHODS, Objective, build_method
from compress.evaluate import predict
from compress.models import create_model, load_checkpoint, resolve_name, save_checkpoint
from compress.stages import register
from compress.stages.common import (MODEL_FILE, extra_teachers, load_stage_model, model_meta, pretrained_identity,
                                    pretrained_source, review)
from compress.train import fit, seed_everything

log = logging.getLogger(__name__)


def load_teachers(ctx: RunContext, teacher: torch.nn.Module) -> list[torch.nn.Module]:
    """The teachers the distillation method learns from: ``teacher`` (the pipeline's, already loaded)
    first, or the assistant."""
    kind = METHODS[ctx.cfg.distill.method]
    if kind.teachers == "none":
        return []
    if kind.uses_assistant:
        return [load_stage_model(ctx, "assistant")]
    teachers = [teacher]
    for extra in extra_teachers(ctx):
        teachers.append(load_checkpoint(ctx.stage_dir("teacher") / "teachers" / extra / MODEL_FILE)[0])
    return teachers


def identity(ctx: RunContext) -> dict:
    return pretrained_identity(ctx.cfg.distill.pretrained, "distill.pretrained")


def models(ctx: RunContext) -> list[tuple[str, str, bool | str]]:
    return [("student", resolve_name(ctx.cfg.distill.student), ctx.cfg.distill.pretrained)]


@register("distill", identity=identity, models=models)
def run(ctx: RunContext, out: Path, work: Path) -> dict:
    cfg, data = ctx.cfg.distill, ctx.data
    name = resolve_name(cfg.student)
    teacher = load_stage_model(ctx, "teacher")
    seed_everything(ctx.cfg.seed)
    student = create_model(name, data.num_classes, pretrained=cfg.pretrained)

    def make_model(model_name: str, k: int) -> torch.nn.Module:
        seed_everything(ctx.cfg.seed + 1000 * k)  # each peer its own initialization
        return create_model(model_name, data.num_classes)

    objective = build_method(cfg.method, cfg.params, alpha=cfg.alpha, temperature=cfg.temperature,
                             label_smoothing=cfg.label_smoothing)
    objective.bind(student, load_teachers(ctx, teacher), image_size=data.image_size, train_ds=data.train,
                   make_model=make_model, student_name=name)
    result = fit(student, data.train, data.val, cfg, objective, work, seed=ctx.cfg.seed,
                 batch_size=ctx.cfg.data.batch_size, desc=f"distill {name} ({cfg.method})")
    info: dict = {}
    if objective.candidates():  # mutual learning: continue with the chosen peer
        student, name, info = _choose_peer(ctx, objective, student, name)
    teacher_name = ctx.metrics("teacher")["model"]
    meta = {**model_meta(ctx, name, "student"), "teacher": teacher_name,
            "method": cfg.method, "alpha": cfg.alpha, "temperature": cfg.temperature}
    save_checkpoint(student, out / MODEL_FILE, meta)
    if "assistant" in ctx.results:
        info["assistant"] = ctx.metrics("assistant")["model"]
    return {
        "model": name,
        "teacher": teacher_name,
        "method": cfg.method,
        "start": pretrained_source(cfg.pretrained),
        "method_params": objective.p.model_dump(mode="json"),
        "alpha": cfg.alpha,
        "temperature": cfg.temperature,
        **info,
        **review(ctx, teacher, student),
        "history": result.history,
        "resumed_from_epoch": result.resumed_from_epoch,
        "train_seconds": round(result.seconds, 2),
        "seconds_per_epoch": round(result.seconds / max(1, cfg.epochs - result.resumed_from_epoch), 3),
    }


def _choose_peer(ctx: RunContext, objective: Objective, student: torch.nn.Module,
                 name: str) -> tuple[torch.nn.Module, str, dict]:
    """The peer the pipeline continues with: the student, or the one best on the validation split."""
    data = ctx.data
    models = [student] + objective.candidates()
    names = [name] + list(objective.peer_names)
    val = [M.accuracy(*predict(m, data.val)) for m in models]
    pick = 0 if objective.p.keep == "student" else max(range(len(val)), key=lambda i: (val[i], -i))
    info = {"peers": [{"model": n, "val_accuracy": v, "test_accuracy": M.accuracy(*predict(m, data.test))}
                      for n, v, m in zip(names, val, models)],
            "chosen_peer": pick}
    log.info(f"[distill] continuing with peer {pick} ({names[pick]}, val accuracy {val[pick]:.4f})")
    return models[pick], names[pick], info
