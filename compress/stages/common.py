"""What several stages share: the checkpoint file name, its metadata, loading an earlier stage's model
and measuring a model on the test split."""

from __future__ import annotations

from pathlib import Path

import torch

from compress import metrics as M
from compress.context import RunContext
from compress.distill import METHODS
from compress.evaluate import predict
from compress.errors import CompressError
from compress.fsio import sha256_file
from compress.models import load_checkpoint, resolve_name

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


def evaluate_model(model: torch.nn.Module, ctx: RunContext) -> dict:
    """Test accuracy, parameters and MACs of a model."""
    logits, targets = predict(model, ctx.data.test)
    return {"test_accuracy": M.accuracy(logits, targets), "params": M.count_params(model),
            "macs": M.count_macs(model, ctx.data.image_size)}


def review(ctx: RunContext, teacher: torch.nn.Module, student: torch.nn.Module) -> dict:
    """The review's metrics (eqs. 6-9) of a student against its teacher on the test split."""
    data = ctx.data
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
