"""Stage ``teacher``: the model the student learns from.

Reads: ``teacher.checkpoint`` (safetensors, or a torch file read with ``weights_only=True``) when set,
else ``teacher.pretrained`` (``true``: the model's published weights; or a local weights file) to start from;
the cache of trained teachers (``<artifacts>/.cache/teachers/<key>/``).
Writes: ``model.safetensors`` + ``model.json``; with multi-teacher KD, each extra teacher under
``teachers/<name>/``. A teacher trained here is stored in the cache, so every run with the same model,
training settings, data and seed reuses it. An entry records the hash of each of its files and is
checked before it is reused; while one run trains a teacher, another that needs the same entry waits
for it (a lock per entry) and then reuses it."""

from __future__ import annotations

import logging
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from compress import dist
from compress.context import RunContext
from compress.distill import HintonKD, logit_objective
from compress.errors import CompressError
from compress.fsio import (damage, link_or_copy, locked, manifest, read_json, replace_dir, sha256_file, sha256_json,
                          write_json)
from compress.graph import FORMAT_VERSION
from compress.models import create_model, load_checkpoint, load_weights, model_spec, resolve_name, save_checkpoint
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
    """The teachers the stage builds. A ``teacher.checkpoint`` is loaded into its model here, before
    the run starts (the runner asks for these models first), so a file of another architecture is
    refused with nothing written."""
    cfg = ctx.cfg.teacher
    if cfg.checkpoint:
        name = resolve_name(cfg.model)
        load_weights(create_model(name, ctx.data.num_classes), Path(cfg.checkpoint).expanduser(),
                     what="teacher checkpoint", name=name)
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
        if "test_accuracy" not in info and not ctx.withhold_test:  # cached by a tuning trial, test withheld
            info.update(evaluate_model(load_checkpoint(out / MODEL_FILE)[0], ctx))
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
    cached, metrics). The cache entry is locked while it is trained and stored."""
    key = cache_key(ctx, name)
    cache = ctx.cache_dir / "teachers" / key
    main = dist.is_main()  # under torchrun rank 0 alone reads and writes the cache; the others follow it
    with locked(cache.with_name(f"{key}.lock"), f"teacher cache entry {key[:12]} ({name})") if main else nullcontext():
        cached = _from_cache(cache, out, name) if main and not ctx.force else None
        if dist.broadcast(cached is not None):
            return None, cached if main else {}
        model, info = _train(ctx, name, out, work)
        if main:
            _store_cache(out, info, cache)
    return model, {**info, "cached": False}


def _train(ctx: RunContext, name: str, out: Path, work: Path) -> tuple[torch.nn.Module, dict]:
    cfg, data = ctx.cfg.teacher, ctx.data
    seed_everything(ctx.cfg.seed)
    pretrained = starting_weights(ctx, name)
    model = create_model(name, data.num_classes, pretrained=pretrained)
    info: dict = {"model": name, "source": f"{pretrained_source(pretrained)}, fine-tuned" if pretrained
                  else "trained from scratch"}
    objective = logit_objective(HintonKD(alpha=0.0, label_smoothing=cfg.label_smoothing), model)
    train_cfg = cfg.model_copy(update={"lr": cfg.lr * model_spec(name).lr_scale})
    info["lr"] = train_cfg.lr
    result = fit(model, data.train, data.val, train_cfg, objective, work, seed=ctx.cfg.seed,
                 batch_size=ctx.cfg.data.batch_size, desc=f"teacher {name}", on_epoch_end=ctx.epoch_hooks.get("teacher"))
    info["history"] = result.history
    info.update(result.selection())
    info["derived"] = ctx.derived.get("teacher")
    info["train_seconds"] = round(result.seconds, 2)
    save_checkpoint(model, out / MODEL_FILE, model_meta(ctx, name, "teacher"))
    info.update(evaluate_model(model, ctx))
    return model, info


CACHE_FILES = "files.json"  # the entry's files with their sizes and hashes


def _from_cache(cache: Path, out: Path, name: str) -> dict | None:
    """The metrics of the cached teacher, its files linked into ``out``; None when there is no entry
    or it is damaged (then it is trained again)."""
    if not (cache / "metrics.json").is_file():
        return None
    try:
        files = read_json(cache / CACHE_FILES) if (cache / CACHE_FILES).is_file() else None  # None: older entry
        why = damage(cache, files) if files is not None else None
        metrics = read_json(cache / "metrics.json")
    except (ValueError, TypeError, KeyError, AttributeError, OSError):
        why, metrics = "its records cannot be read", None
    if why or not isinstance(metrics, dict):
        log.warning(f"[teacher] cached {name} in {cache} is damaged ({why or 'metrics.json is not a record'}); "
                    "training it again")
        return None
    log.info(f"[teacher] reusing cached {name} from {cache}")
    out.mkdir(parents=True, exist_ok=True)
    for f in (MODEL_FILE, "model.json"):
        link_or_copy(cache / f, out / f)
    return {**metrics, "source": f"cache {cache}", "cached": True}


def _store_cache(out: Path, info: dict, cache: Path) -> None:
    tmp = cache.with_name(f".{cache.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in (MODEL_FILE, "model.json"):
        link_or_copy(out / f, tmp / f)
    write_json(tmp / "metrics.json", info)
    write_json(tmp / CACHE_FILES, manifest(tmp, exclude=(CACHE_FILES,)))
    replace_dir(tmp, cache)
