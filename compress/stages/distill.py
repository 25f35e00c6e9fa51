"""Stage ``distill``: the student trained with the recipe's distillation method (``distill.method``),
starting from ``distill.pretrained`` weights when set (published ones, or a local file; peers of
mutual learning start from scratch).

Reads: ``teacher/model.safetensors`` (and ``teacher/teachers/*`` for multi-teacher KD, or
``assistant/model.safetensors`` for ``ta``).
Writes: ``model.safetensors`` + ``model.json`` of the student (with ``dml``, the peer best on the
validation split), and the review's metrics against the teacher (eqs. 6-9) in ``metrics.json``; for a
method that needs only the teachers' logits (``distill.teacher_cache``), the teachers' logits of every
training batch in ``<artifacts>/.cache/teacher_logits/<key>/`` (read instead when already there)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from compress import metrics as M
from compress.context import RunContext
from compress.distill import METHODS, Objective, build_method
from compress.distill.cache import TeacherLogitCache
from compress.evaluate import predict
from compress.models import create_model, load_checkpoint, resolve_name, save_checkpoint
from compress.stages import register
from compress.stages.common import (MODEL_FILE, extra_teachers, load_stage_model, model_meta, pretrained_identity,
                                    pretrained_source, review, teacher_logit_cache)
from compress.train import fit, seed_everything

log = logging.getLogger(__name__)


def teacher_files(ctx: RunContext) -> list[Path]:
    """The checkpoints of the teachers the distillation method learns from: the pipeline's teacher
    first, then the extra teachers; or the assistant."""
    kind = METHODS[ctx.cfg.distill.method]
    if kind.teachers == "none":
        return []
    if kind.uses_assistant:
        return [ctx.stage_dir("assistant") / MODEL_FILE]
    folder = ctx.stage_dir("teacher")
    return [folder / MODEL_FILE] + [folder / "teachers" / extra / MODEL_FILE for extra in extra_teachers(ctx)]


def load_teachers(ctx: RunContext, teacher: torch.nn.Module) -> list[torch.nn.Module]:
    """The models of :func:`teacher_files`, ``teacher`` (the pipeline's, already loaded) not loaded again."""
    main = ctx.stage_dir("teacher") / MODEL_FILE
    return [teacher if f == main else load_checkpoint(f)[0] for f in teacher_files(ctx)]


def attach_teacher_cache(ctx: RunContext, objective: Objective) -> tuple[list[TeacherLogitCache], str | None]:
    """Let ``objective`` read its teachers' logits from the cache, one entry per teacher; returns the
    caches, or none and why the cache is not used (off in the recipe, no teacher, or a method that
    needs the teachers' features). ``--force`` computes and stores the entries again."""
    cfg = ctx.cfg.distill
    files = teacher_files(ctx)
    why = ("off in the recipe (distill.teacher_cache: false)" if not cfg.teacher_cache
           else f"{cfg.method} has no teacher" if not files
           else f"{cfg.method} needs more of the teacher than its logits" if not objective.logit_only else None)
    if why is not None:
        log.info(f"[distill] teacher-output cache not used: {why}")
        return [], why
    caches = [teacher_logit_cache(ctx, f, cfg, ctx.cfg.seed) for f in files]
    objective.use_teacher_cache(caches)
    return caches, None


def identity(ctx: RunContext) -> dict:
    return pretrained_identity(ctx.cfg.distill.pretrained, "distill.pretrained")


def config(ctx: RunContext) -> dict:
    """The distill section as the stage's fingerprint reads it: without the eq. (1) ``alpha`` and
    ``temperature`` the method does not compute with."""
    cfg = ctx.cfg.distill
    return {k: v for k, v in cfg.model_dump(mode="json").items()
            if k not in ("alpha", "temperature") or k in METHODS[cfg.method].reads}


def in_effect_values(used: dict[str, float]) -> dict[str, float | None]:
    """``alpha`` and ``temperature`` as the method computed with them (None where it has none)."""
    return {k: next((v for key, v in used.items() if key.rsplit(".", 1)[1] == k), None)
            for k in ("alpha", "temperature")}


def models(ctx: RunContext) -> list[tuple[str, str, bool | str]]:
    return [("student", resolve_name(ctx.cfg.distill.student), ctx.cfg.distill.pretrained)]


@register("distill", config=config, identity=identity, models=models)
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
    caches, not_used = attach_teacher_cache(ctx, objective)
    result = fit(student, data.train, data.val, cfg, objective, work, seed=ctx.cfg.seed,
                 batch_size=ctx.cfg.data.batch_size, desc=f"distill {name} ({cfg.method})",
                 on_epoch_end=ctx.epoch_hooks.get("distill"))
    for cache in caches:
        log.info(f"[distill] {cache.summary()}")
    info: dict = {}
    if objective.candidates():  # mutual learning: continue with the chosen peer
        student, name, info = _choose_peer(ctx, objective, student, name)
    teacher_name = ctx.metrics("teacher")["model"]
    used = objective.in_effect()
    meta = {**model_meta(ctx, name, "student"), "teacher": teacher_name, "method": cfg.method,
            **in_effect_values(used), "in_effect": used}
    save_checkpoint(student, out / MODEL_FILE, meta)
    if "assistant" in ctx.results:
        info["assistant"] = ctx.metrics("assistant")["model"]
    return {
        "model": name,
        "teacher": teacher_name,
        "method": cfg.method,
        "start": pretrained_source(cfg.pretrained),
        "method_params": objective.p.model_dump(mode="json"),
        **in_effect_values(used),
        "in_effect": used,
        **info,
        **review(ctx, teacher, student),
        "history": result.history,
        **result.selection(),
        "derived": ctx.derived.get("distill"),
        "teacher_cache": {"entries": [{"key": c.key, **c.stats} for c in caches]} if caches else {"not_used": not_used},
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
    info = {"peers": [{"model": n, "val_accuracy": v,
                       **({} if ctx.withhold_test else {"test_accuracy": M.accuracy(*predict(m, data.test))})}
                      for n, v, m in zip(names, val, models)],
            "chosen_peer": pick}
    log.info(f"[distill] continuing with peer {pick} ({names[pick]}, val accuracy {val[pick]:.4f})")
    return models[pick], names[pick], info
