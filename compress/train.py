"""The one training loop: seeded, resumable from a per-epoch checkpoint, used by every stage that trains.

Each epoch reseeds every random source from (seed, epoch), so an epoch's result depends only on the
state at its start; a run killed anywhere resumes from the last finished epoch and ends bit-identical
to an uninterrupted one (on the same machine and thread count).

Under torchrun (``compress.dist``) the loop is data parallel: the student is wrapped in torch's
DistributedDataParallel, each process trains on its share of every global batch (``batch_size`` is
the global batch, split evenly), what an objective trains besides the student (adapters, peers) has
its gradients averaged too, and rank 0 alone writes the checkpoint, which it hands to the others on
resume. On CUDA the forward runs under autocast (``compress.dist.options``)."""

from __future__ import annotations

import io
import logging
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import Dataset, Subset

from compress import dist
from compress.errors import CompressError, short
from compress.evaluate import TrainLoader, decoded_once, predict
from compress.fsio import atomic_path, write_bytes
from compress.metrics import accuracy

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
#: validations (and checkpoints) a schedule of unset ``val_every`` makes at most, about
MAX_VALIDATIONS = 60
#: a schedule given in steps validates at most once every this many steps (``val_every`` unset)
MIN_STEPS_BETWEEN_VALIDATIONS = 20


class TrainConfig(BaseModel):
    """Settings of the one training loop, shared by every stage that trains."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    epochs: int = Field(15, ge=0, le=10_000)
    steps: int | None = Field(None, ge=1, le=10_000_000, description="schedule length in optimization steps: the "
                              "stage trains for ceil(steps / batches per epoch) epochs, whatever the number of "
                              "training images, and the settings counted in epochs (warm-up, freeze points) keep "
                              "their share of `epochs`; unset: `epochs` as written")
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    warmup_epochs: int = Field(1, ge=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    mixup: float = Field(0.0, ge=0.0, le=10.0, description="mixup Beta(α, α); 0 = off (timm's Mixup)")
    cutmix: float = Field(0.0, ge=0.0, le=10.0, description="cutmix Beta(α, α); 0 = off")
    mixup_prob: float = Field(1.0, ge=0.0, le=1.0, description="share of batches mixed")
    mixup_switch_prob: float = Field(0.5, ge=0.0, le=1.0, description="with both on: share of cutmix")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    select: Literal["best", "last"] = Field("best", description="which weights the stage keeps: those of the epoch "
                                            "best on the validation split (the later one on a tie), or the last")
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0, description="keep an exponential moving average of the "
                                    "weights (timm's ModelEmaV3, decay warmed up over the first steps); the "
                                    "average is what is validated and kept; unset: off")
    val_every: int | None = Field(None, ge=1, le=10_000, exclude_if=lambda v: v is None,
                                  description="validate, offer the weights for keeping and checkpoint every N epochs "
                                  "and after the last; unset: every epoch, and on a schedule of more than "
                                  f"{MAX_VALIDATIONS} epochs about {MAX_VALIDATIONS} times in all; a schedule in "
                                  f"`steps` also validates at most once every {MIN_STEPS_BETWEEN_VALIDATIONS} steps")

    #: settings counted in epochs, scaled with the derived epoch count when ``steps`` is set
    EPOCH_SETTINGS: ClassVar[tuple[str, ...]] = ("warmup_epochs",)


def batches_per_epoch(train_images: int, batch_size: int) -> int:
    """Optimization steps in one epoch of :class:`compress.evaluate.TrainLoader` (the short last batch
    is dropped when there is more than one batch)."""
    return max(1, train_images // batch_size) if train_images > batch_size else 1


def resolve_schedule(cfg: TrainConfig, train_images: int, batch_size: int) -> tuple[TrainConfig, dict | None]:
    """``cfg`` with ``steps`` turned into epochs for this data: ceil(steps / batches per epoch) epochs,
    and every setting counted in epochs (:attr:`TrainConfig.EPOCH_SETTINGS`) scaled by the same factor
    as ``epochs`` (rounded, at most the new count). Returns the resolved config (``steps`` cleared) and
    what was derived, or ``cfg`` and None when ``steps`` is unset."""
    if cfg.steps is None:
        return cfg, None
    per_epoch = batches_per_epoch(train_images, batch_size)
    epochs = max(1, math.ceil(cfg.steps / per_epoch))
    factor = epochs / max(1, cfg.epochs)
    update: dict = {"epochs": epochs, "steps": None}
    for name in type(cfg).EPOCH_SETTINGS:
        update[name] = min(epochs, int(round(getattr(cfg, name) * factor)))
    record = {"steps": cfg.steps, "batches_per_epoch": per_epoch, "epochs": epochs,
              **{k: v for k, v in update.items() if k not in ("epochs", "steps")}}
    every = max(math.ceil(epochs / MAX_VALIDATIONS), math.ceil(MIN_STEPS_BETWEEN_VALIDATIONS / per_epoch))
    # small sets: several epochs between validations; where that is 1, nothing changes and val_every
    # stays unset, so the stage's fingerprint (which reads the resolved settings) is what it was
    if cfg.val_every is None and every > 1:
        update["val_every"] = every
    resolved = cfg.model_copy(update=update)
    interval = validation_interval(resolved)
    if interval > 1:
        record["validated every"] = f"{interval} epochs"
    return resolved, record


def validation_interval(cfg: TrainConfig) -> int:
    """Every how many epochs the loop validates and checkpoints: ``val_every``, or 1 up to
    :data:`MAX_VALIDATIONS` epochs and ceil(epochs / MAX_VALIDATIONS) beyond, so that 200 images on a
    schedule of 2,000 steps (667 epochs of 3 batches) are not validated 667 times."""
    return cfg.val_every or max(1, math.ceil(cfg.epochs / MAX_VALIDATIONS))


def batch_mixer(cfg: TrainConfig, num_classes: int):
    """timm's Mixup for ``cfg`` (mixup and/or cutmix on whole batches), or None when both are off. It
    returns soft targets (label smoothing included), which every objective's cross-entropy accepts."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing, num_classes=num_classes)


def hard_labels(y: torch.Tensor) -> torch.Tensor:
    """Class indices of targets that may be soft (mixup)."""
    return y.argmax(1) if y.is_floating_point() else y


class Objective(nn.Module):
    """What the loop minimizes: ``forward(model, x, y) -> (loss, model_logits)``.

    The interface the training loop needs and nothing more; the distillation methods implement it.
    Modules registered on the objective (adapters, peers) are optimized and checkpointed with the
    model; ``frozen_models()`` (teachers) are moved to the device and never trained."""

    def frozen_models(self) -> list[nn.Module]:
        return []

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Called at the start of each epoch (0-based)."""

    def release(self) -> None:
        """Called when training ends: remove hooks put on the model."""

    #: whether ``forward`` accepts soft targets (batch, classes), as mixup and cutmix produce
    soft_targets: bool = True

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def pick_device(requested: str = "auto") -> torch.device:
    """The device to train on; under torchrun on CUDA, this process's own GPU."""
    if dist.active() and requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank())
    if requested != "auto":
        ok = {"cpu": True, "cuda": torch.cuda.is_available(),
              "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
        if not ok[requested]:
            raise CompressError(f"device {requested!r} is not available on this machine; use device: auto")
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**31)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0
    seconds: float = 0.0
    selected_epoch: int = 0  # the epoch whose weights the model leaves with (0: no epoch ran)
    selected_val_acc: float | None = None
    ema: bool = False

    def selection(self) -> dict:
        """What a stage records of the kept weights."""
        return {"selected_epoch": self.selected_epoch, "selected_val_accuracy": self.selected_val_acc,
                "ema": self.ema}


@dataclass
class _Keeper:
    """The weights a run keeps: every epoch's candidate (the model, or its moving average) is scored on
    the validation split; ``state`` holds the best one so far (the later on a tie) when ``select`` is
    ``best``, the last one when it is ``last`` (a moving average), none when it is ``none`` (the model
    itself is what is kept)."""

    select: str
    epoch: int = 0
    val_acc: float | None = None
    state: dict | None = None

    def offer(self, epoch: int, val_acc: float, candidate: nn.Module) -> None:
        if self.select == "none":  # the model as it is: nothing to copy
            self.epoch, self.val_acc = epoch, val_acc
            return
        if self.select == "best" and self.val_acc is not None and not val_acc >= self.val_acc:
            return
        self.epoch, self.val_acc = epoch, val_acc
        self.state = {k: v.detach().cpu().clone() for k, v in candidate.state_dict().items()}

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "val_acc": self.val_acc, "state": self.state}

    def load(self, saved: dict | None) -> None:
        if saved:
            self.epoch, self.val_acc, self.state = int(saved["epoch"]), saved["val_acc"], saved["state"]


def lr_at(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine decay to zero, as a pure function of the position (resume-safe)."""
    pos = epoch + step / max(1, steps_per_epoch)
    if cfg.warmup_epochs and pos < cfg.warmup_epochs:
        return cfg.lr * (pos + 1.0 / max(1, steps_per_epoch)) / cfg.warmup_epochs
    span = max(1e-9, cfg.epochs - cfg.warmup_epochs)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(1.0, (pos - cfg.warmup_epochs) / span)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def _save_state(path: Path, state: dict) -> None:
    # serialized in memory first: torch.save on a full disk raises an error without an errno, the
    # write below a plain OSError (ENOSPC) that the command line reports in one line
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getvalue())


def fit(
    model: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset,
    cfg: TrainConfig,
    objective: Objective,
    work_dir: Path,
    *,
    seed: int,
    batch_size: int,
    desc: str = "train",
    on_epoch_end: Callable[[int, dict], None] | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
) -> FitResult:
    """Train ``model`` in place for ``cfg.epochs`` minimizing ``objective``; resume from
    ``work_dir/last.pt`` if present. What the objective trains besides the model (regressors, peers)
    is optimized and checkpointed with it; its hooks are removed when training ends."""
    device = pick_device(cfg.device)
    model.to(device)
    for t in objective.frozen_models():
        t.to(device)
    objective.to(device)
    try:
        return _fit(model, objective, train_ds, val_ds, cfg, work_dir, device, seed=seed, batch_size=batch_size,
                    desc=desc, on_epoch_end=on_epoch_end, on_epoch_start=on_epoch_start)
    finally:
        objective.release()


def _fit(model, objective, train_ds, val_ds, cfg, work_dir, device, *, seed, batch_size, desc, on_epoch_end,
         on_epoch_start) -> FitResult:
    world = dist.world()
    if batch_size % world:
        raise CompressError(f"{desc}: data.batch_size {batch_size} does not split evenly over {world} processes; "
                            f"use a multiple of {world}")
    per_process = batch_size // world
    val_ds = decoded_once(val_ds)  # validated every epoch: image files decoded once
    hw = dist.hardware_plan(device, per_process)
    if hw.channels_last:  # the teachers too: their forward pass reads the same NHWC batch
        for m in (model, objective, *objective.frozen_models()):
            m.to(memory_format=torch.channels_last)
    restore_batchnorm = dist.sync_batchnorm(model) if hw.sync_bn else None
    optimizer = make_optimizer(nn.ModuleList([model, objective]), cfg)
    mixer = batch_mixer(cfg, _num_classes(train_ds))
    if mixer is not None and not objective.soft_targets:
        raise CompressError(f"{desc}: this objective needs hard labels; set mixup and cutmix to 0")
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = work_dir / CHECKPOINT
    result = FitResult(ema=cfg.ema_decay is not None)
    ema = _ema(model, cfg)
    keeper = _Keeper(cfg.select if cfg.select == "best" or ema is not None else "none")
    start = 0
    state = _load_state(ckpt_path, device)  # rank 0 reads it and hands it to the others
    if state is not None:
        # load_state_dict copies every tensor that fits before it refuses the rest: starting over
        # starts from these weights, not from a mix of them and the checkpoint's
        initial = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in (model, objective)]
        try:
            model.load_state_dict(state["model"])
            objective.load_state_dict(state.get("objective", {}))
            optimizer.load_state_dict(state["optimizer"])
            if ema is not None:
                ema.module.load_state_dict(state["ema"])
            keeper.load(state.get("kept"))
            start, result.history = int(state["epoch"]), list(state["history"])
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint restarts the stage from scratch
            log.warning(f"{desc}: checkpoint {ckpt_path} cannot be resumed from ({short(e, 120)}); starting over")
            start, result.history = 0, []
            for m, values in zip((model, objective), initial):
                m.load_state_dict(values)
            optimizer = make_optimizer(nn.ModuleList([model, objective]), cfg)
            keeper = _Keeper(keeper.select)
            ema = _ema(model, cfg)
        result.resumed_from_epoch = start
        if start:
            log.info(f"{desc}: resuming after epoch {start}/{cfg.epochs}")
    net = dist.data_parallel(model, objective, device)
    t0 = time.perf_counter()
    n_train = len(train_ds)
    feed = TrainLoader(train_ds, per_process, pin_memory=device.type == "cuda", rank=dist.rank(), world=world)
    try:
        _epochs(net, model, objective, optimizer, feed, mixer, val_ds, cfg, ckpt_path, device, hw, result, start,
                seed, desc, n_train, on_epoch_end, on_epoch_start, ema, keeper)
    finally:
        feed.close()
        if restore_batchnorm is not None:
            restore_batchnorm()
    result.selected_epoch, result.selected_val_acc = keeper.epoch, keeper.val_acc
    if keeper.state is not None:  # the kept weights: the best epoch's, or the moving average's
        model.load_state_dict(keeper.state)
        if keeper.epoch != len(result.history) or ema is not None:
            log.info(f"{desc}: keeping the weights of epoch {keeper.epoch}{' (moving average)' if ema else ''}, "
                     f"val_acc {keeper.val_acc:.4f}")
    dist.sync_buffers(model)  # every process leaves with rank 0's model, running statistics included
    result.seconds = time.perf_counter() - t0
    model.eval()
    objective.eval()
    return result


def _load_state(path: Path, device: torch.device) -> dict | None:
    """The checkpoint at ``path`` as rank 0 reads it (None: none, or unreadable), on every process."""
    state = None
    if dist.is_main() and path.exists():
        try:
            state = torch.load(path, map_location=device if not dist.active() else "cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint restarts the stage from scratch
            state = {}
    return dist.broadcast(state)


def _num_classes(ds: Dataset) -> int:
    base = ds.dataset if hasattr(ds, "dataset") else ds
    labels = getattr(base, "labels", None)
    return int(labels.max()) + 1 if labels is not None and len(labels) else 1


def _ema(model: nn.Module, cfg: TrainConfig):
    """timm's ModelEmaV3 of ``model`` when ``cfg.ema_decay`` is set: the decay warms up as
    1 - (1 + step)^-3/4 (timm's setting for runs of under 10k steps) to at most ``ema_decay``."""
    if cfg.ema_decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True, warmup_power=3 / 4)


def _epochs(net, model, objective, optimizer, feed, mixer, val_ds, cfg, ckpt_path, device, hw, result, start, seed,
            desc, n_train, on_epoch_end, on_epoch_start, ema, keeper) -> None:
    scaler = torch.amp.GradScaler("cuda") if hw.autocast_dtype == torch.float16 else None
    every = validation_interval(cfg)
    total_loss, correct, seen = 0.0, 0, 0  # since the last validation
    for epoch in range(start, cfg.epochs):
        # each process its own random stream (augmentation, mixup, dropout: two processes must not draw
        # the same shifts for their halves of a batch); rank 0's is a one-process run's. The order of
        # the epoch is one seed for all.
        seed_everything(_epoch_seed(seed, epoch) + dist.rank() * 1_000_003)
        batches = feed.epoch(_epoch_seed(seed, epoch))
        steps = len(batches)
        model.train()
        objective.train()
        objective.set_epoch(epoch, cfg.epochs)
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        bar = _progress(batches, f"{desc} {epoch + 1}/{cfg.epochs}")
        for step, (x, y) in enumerate(bar):
            for g in optimizer.param_groups:
                g["lr"] = lr_at(cfg, epoch, step, steps)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if hw.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if mixer is not None and len(y) % 2 == 0:
                x, y = mixer(x, y)
            with torch.autocast(device.type, dtype=hw.autocast_dtype) if hw.autocast_dtype else nullcontext():
                loss, logits = objective(net, x, y)
            if not torch.isfinite(loss):
                raise CompressError(f"{desc}: loss became {loss.item()} at epoch {epoch + 1}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                dist.average_gradients(objective)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                dist.average_gradients(objective)
                optimizer.step()
            if ema is not None:
                ema.update(model, step=epoch * steps + step + 1)
            total_loss += loss.item() * len(y)
            correct += int((logits.argmax(1) == hard_labels(y)).sum())
            seen += len(y)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
        if (epoch + 1) % every and epoch + 1 < cfg.epochs:
            continue  # validated, offered and checkpointed every `every` epochs and after the last
        if dist.active():  # the epochs' figures over every process's share
            total_loss, correct, seen = dist.all_sum([total_loss, correct, seen])
        candidate = ema.module if ema is not None else model
        row = {"epoch": epoch + 1, "loss": total_loss / max(1, seen), "train_acc": correct / max(1, seen),
               "val_acc": _val_accuracy(candidate, val_ds, device), "lr": optimizer.param_groups[0]["lr"]}
        result.history.append(row)
        keeper.offer(epoch + 1, row["val_acc"], candidate)
        log.info(f"{desc} epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']:.4f} train_acc {row['train_acc']:.4f} "
             f"val_acc {row['val_acc']:.4f} ({n_train} images)")
        if dist.is_main():
            model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            extra_state = {k: v.detach().cpu() for k, v in objective.state_dict().items()}
            extra = {"ema": {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}} if ema is not None else {}
            _save_state(ckpt_path, {"model": model_state, "objective": extra_state,
                                    "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                                    "history": result.history, "kept": keeper.to_dict(), **extra})
        total_loss, correct, seen = 0.0, 0, 0
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row)


def _val_accuracy(model: nn.Module, val_ds: Dataset, device: torch.device) -> float:
    """Accuracy of rank 0's model on the validation split. Under several processes each evaluates
    every world-th image with rank 0's running statistics, and the counts are summed."""
    if not dist.active():
        return accuracy(*predict(model, val_ds, device=device))
    dist.sync_buffers(model)  # each process's BatchNorm statistics moved with its own last batch
    share = Subset(val_ds, range(dist.rank(), len(val_ds), dist.world()))
    correct = 0
    if len(share):
        logits, targets = predict(model, share, device=device)
        correct = int((logits.argmax(1) == targets).sum())
    correct, seen = dist.all_sum([correct, len(share)])
    return correct / seen if seen else float("nan")


def _progress(it, desc: str):
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(it, desc=desc, leave=False, dynamic_ncols=True)
    return it
