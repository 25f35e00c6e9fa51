"""What several stages share: the checkpoint file name, its metadata, loading an earlier stage's model
and measuring a model on the test split."""

from __future__ import annotations

from pathlib import Path

import torch

from compress import dist
from compress import metrics as M
from compress.context import RunContext
from compress.distill import METHODS, Objective
from compress.distill.cache import TeacherLogitCache, entry_key
from compress.evaluate import predict
from compress.errors import CompressError
from compress.fsio import read_json, sha256_file
from compress.models import load_checkpoint, resolve_name
from compress.train import TrainConfig, pick_device

MODEL_FILE = "model.safetensors"


def model_meta(ctx: RunContext, name: str, role: str) -> dict:
    """What a checkpoint's JSON records: the architecture, the classes and the input it expects."""
    d = ctx.data
    return {"model": resolve_name(name), "role": role, "num_classes": d.num_classes, "image_size": d.image_size,
            "mean": list(d.mean), "std": list(d.std), "class_names": d.class_names, "dataset": d.name}


def pretrained_file(value: bool | str, key: str) -> Path | None:
    """The local weights file a ``pretrained: PATH`` setting names (``key`` is the recipe key, for the
    message), or None for ``true``/``false``."""
    if isinstance(value, bool) or not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise CompressError(f"{key}: pretrained weights not found: {path}")
    return path


def pretrained_identity(value: bool | str, key: str) -> dict:
    """What a stage's output depends on beyond the recipe's text: the hash of a pretrained weights file
    (another file at the same path must not reuse the stage)."""
    path = pretrained_file(value, key)
    return {"pretrained_sha256": sha256_file(path)} if path is not None else {}


def pretrained_source(value: bool | str) -> str:
    """How a model started, for its metrics."""
    if value is True:
        return "published pretrained weights"
    return f"pretrained weights {value}" if value else "random initialization"


def load_stage_model(ctx: RunContext, stage: str) -> torch.nn.Module:
    model, _ = load_checkpoint(ctx.stage_dir(stage) / MODEL_FILE)
    return model


def teacher_cache_identity(ctx: RunContext, teacher_file: Path, train_cfg: TrainConfig, seed: int) -> dict:
    """What one teacher's logits on the training batches of a ``fit`` with ``train_cfg`` and ``seed``
    depend on: the teacher (its weights and architecture by content, so the assistant of ``ta`` and
    each teacher of ``multi_teacher`` have their own entry, and the pipeline's teacher the same one
    whatever the stage or method), the data, the seed and the batch plan: the global batch size and
    the processes sharing it, the training images, the batch mixing and the device. The student, the
    method, the stage and the number of epochs (one file each) are not part of it, so distill,
    prune's first step and QAT, which share the recipe's seed, share one entry.
    :func:`compress.distill.cache.entry_key` adds the format and library versions."""
    meta = teacher_file.with_suffix(".json")
    plan = {"batch_size": ctx.cfg.data.batch_size, "world": dist.world(), "train_images": len(ctx.data.train),
            "device": pick_device(train_cfg.device).type, "mixup": train_cfg.mixup, "cutmix": train_cfg.cutmix,
            "mixup_prob": train_cfg.mixup_prob, "mixup_switch_prob": train_cfg.mixup_switch_prob}
    teacher = {"model": read_json(meta)["model"], "weights_sha256": sha256_file(teacher_file),
               "meta_sha256": sha256_file(meta)}
    return {"teacher": teacher, "data": ctx.data_identity(), "seed": seed, "plan": plan,
            "topk": ctx.cfg.distill.teacher_cache_topk}


def teacher_logit_cache(ctx: RunContext, teacher_file: Path, train_cfg: TrainConfig, seed: int) -> TeacherLogitCache:
    """The teacher-output cache entry of ``teacher_file`` for a ``fit`` with ``train_cfg`` and ``seed``
    (``--force`` computes and stores it again)."""
    ident = teacher_cache_identity(ctx, teacher_file, train_cfg, seed)
    return TeacherLogitCache(ctx.cache_dir / "teacher_logits" / entry_key(ident), topk=ctx.cfg.distill.teacher_cache_topk,
                             rank=dist.rank(), world=dist.world(), read=not ctx.force, describe=ident)


def kd_teacher_cache(ctx: RunContext, objective: Objective, train_cfg: TrainConfig, seed: int) -> TeacherLogitCache | None:
    """For the stages after distill, which fine-tune with Hinton KD against the pipeline's teacher:
    read the teacher's logits through the cache (``distill.teacher_cache``) when the loss uses them."""
    if not (ctx.cfg.distill.teacher_cache and objective.needs_teacher):
        return None
    cache = teacher_logit_cache(ctx, ctx.stage_dir("teacher") / MODEL_FILE, train_cfg, seed)
    objective.use_teacher_cache([cache])
    return cache


def teacher_cache_setting(ctx: RunContext) -> dict:
    """The fingerprint part of the stages after distill that read the teacher-output cache: its
    fp16 (or top-k) logits give other losses than the live teacher's."""
    d = ctx.cfg.distill
    return {"teacher_cache": d.teacher_cache, "teacher_cache_topk": d.teacher_cache_topk}


def evaluate_model(model: torch.nn.Module, ctx: RunContext) -> dict:
    """Test accuracy (none while the test split is withheld), parameters and MACs of a model."""
    out = {"params": M.count_params(model), "macs": M.count_macs(model, ctx.data.image_size)}
    if ctx.withhold_test:
        return out
    logits, targets = predict(model, ctx.data.test)
    return {"test_accuracy": M.accuracy(logits, targets), **out}


def review(ctx: RunContext, teacher: torch.nn.Module, student: torch.nn.Module) -> dict:
    """The review's metrics (eqs. 6-9) of a student against its teacher on the test split."""
    data = ctx.data
    if ctx.withhold_test:
        return {"params": M.count_params(student), "macs": M.count_macs(student, data.image_size)}
    s_logits, targets = predict(student, data.test)
    t_logits, _ = predict(teacher, data.test)
    out = M.review_metrics(t_logits, s_logits, targets, M.count_params(teacher), M.count_params(student))
    return {**out, "test_accuracy": out["accuracy"], "params": M.count_params(student),
            "macs": M.count_macs(student, data.image_size)}


def extra_teachers(ctx: RunContext) -> list[str]:
    """Teachers besides ``teacher.model`` that the distillation method needs (multi-teacher KD)."""
    if METHODS[ctx.cfg.distill.method].teachers != "many":
        return []
    return list(ctx.cfg.distill.method_params().teachers)
