"""Stage ``teacher``: the model the student learns from.

Reads: ``teacher.checkpoint`` (safetensors, or a torch file read with ``weights_only=True``) when set,
else ``teacher.pretrained`` (``true``: the model's published weights; or a local weights file) to start from;
the cache of trained teachers (``<artifacts>/.cache/teachers/<key>/``).
Writes: ``model.safetensors`` + ``model.json``; with multi-teacher KD, each extra teacher under
``teachers/<name>/``. A teacher trained here is stored in the cache, so every run with the same model,
training settings, data and seed reuses it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from compress.context import RunContext
from compress.distill import HintonKD, logit_objective
from compress.errors import CompressError
from compress.fsio import link_or_copy, read_json, replace_dir, sha256_file, sha256_json, write_json
from compress.graph import FORMAT_VERSION
from compress.models import create_model, load_weights, model_spec, resolve_name, save_checkpoint
from compress.stages import register
from compress.stages.common import (MODEL_FILE, evaluate_model, extra_teachers, model_meta, pretrained_identity,
                                    pretrained_source)
from compress.train import fit, seed_everything

log = logging.getLogger(__name__)


def identity(ctx: RunContext) -> dict:
    ident: dict = {}
    ckpt = ctx.cfg.teacher.checkpoint
    if ckpt:
        path = Path(ckpt).expanduser()
        if not path.is_file():
            raise CompressError(f"teacher checkpoint not found: {path}")
        ident["checkpoint_sha256"] = sha256_file(path)
    ident.update(pretrained_identity(ctx.cfg.teacher.pretrained, "teacher.pretrained"))
    if extra_teachers(ctx):
        ident["extra_teachers"] = extra_teachers(ctx)
    return ident


def models(ctx: RunContext) -> list[tuple[str, str, bool | str]]:
    cfg = ctx.cfg.teacher
    main = ("teacher", resolve_name(cfg.model), False if cfg.checkpoint else cfg.pretrained)
    return [main] + [("teacher", t, starting_weights(ctx, t)) for t in extra_teachers(ctx)]


@register("teacher", identity=identity, models=models)
def run(ctx: RunContext, out: Path, work: Path) -> dict:
    cfg, data = ctx.cfg.teacher, ctx.data
    name = resolve_name(cfg.model)
    if cfg.checkpoint:
        model = load_weights(create_model(name, data.num_classes), Path(cfg.checkpoint).expanduser())
        save_checkpoint(model, out / MODEL_FILE, model_meta(ctx, name, "teacher"))
        info = {"model": name, "source": f"checkpoint {cfg.checkpoint}", **evaluate_model(model, ctx), "cached": False}
    else:
        _, info = train_teacher(ctx, name, out, work / name)
    extras = {}
    for extra in extra_teachers(ctx):
        _, extras[extra] = train_teacher(ctx, extra, out / "teachers" / extra, work / extra)
        extras[extra].pop("history", None)
    if extras:
        info["extra_teachers"] = extras
    return info


def cache_key(ctx: RunContext, name: str) -> str:
    """A trained teacher is reused by every run with the same model, starting weights (a file by its
    hash, not its path), training settings, data and seed."""
    pretrained = starting_weights(ctx, name)
    ident = pretrained_identity(pretrained, "teacher.pretrained")
    if ident:
        pretrained = f"sha256:{ident['pretrained_sha256']}"
    cfg = ctx.cfg.teacher.model_copy(update={"model": name, "checkpoint": None, "pretrained": pretrained})
    return sha256_json({"stage": "teacher", "format": FORMAT_VERSION, "config": cfg.model_dump(mode="json"),
                        "data": ctx.data_identity(), "seed": ctx.cfg.seed, "upstream": {}, "extra": {}})


def starting_weights(ctx: RunContext, name: str) -> bool | str:
    """``teacher.pretrained`` for the teacher; the extra teachers of multi-teacher KD start from their
    published weights too when it is ``true``, a file is the teacher's alone."""
    pretrained = ctx.cfg.teacher.pretrained
    return pretrained if pretrained is True or name == resolve_name(ctx.cfg.teacher.model) else False


def train_teacher(ctx: RunContext, name: str, out: Path, work: Path) -> tuple[torch.nn.Module | None, dict]:
    """Train ``name`` as a teacher into ``out`` or link it from the cache; returns (model or None if
    cached, metrics)."""
    cfg, data = ctx.cfg.teacher, ctx.data
    cache = ctx.cache_dir / "teachers" / cache_key(ctx, name)
    if not ctx.force and (cache / "metrics.json").is_file():
        log.info(f"[teacher] reusing cached {name} from {cache}")
        out.mkdir(parents=True, exist_ok=True)
        for f in (MODEL_FILE, "model.json"):
            link_or_copy(cache / f, out / f)
        return None, {**read_json(cache / "metrics.json"), "source": f"cache {cache}", "cached": True}
    seed_everything(ctx.cfg.seed)
    pretrained = starting_weights(ctx, name)
    model = create_model(name, data.num_classes, pretrained=pretrained)
    info: dict = {"model": name, "source": f"{pretrained_source(pretrained)}, fine-tuned" if pretrained
                  else "trained from scratch"}
    objective = logit_objective(HintonKD(alpha=0.0, label_smoothing=cfg.label_smoothing), model)
    train_cfg = cfg.model_copy(update={"lr": cfg.lr * model_spec(name).lr_scale})
    info["lr"] = train_cfg.lr
    result = fit(model, data.train, data.val, train_cfg, objective, work, seed=ctx.cfg.seed,
                 batch_size=ctx.cfg.data.batch_size, desc=f"teacher {name}")
    info["history"] = result.history
    info["train_seconds"] = round(result.seconds, 2)
    save_checkpoint(model, out / MODEL_FILE, model_meta(ctx, name, "teacher"))
    info.update(evaluate_model(model, ctx))
    _store_cache(out, info, cache)
    return model, {**info, "cached": False}


def _store_cache(out: Path, info: dict, cache: Path) -> None:
    tmp = cache.with_name(f".{cache.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in (MODEL_FILE, "model.json"):
        link_or_copy(out / f, tmp / f)
    write_json(tmp / "metrics.json", info)
    replace_dir(tmp, cache)
