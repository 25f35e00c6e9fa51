"""Distributed training through torch.distributed, launched by torchrun.

``torchrun --nproc_per_node=N -m compress pipeline RECIPE`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environment; :func:`init` joins
them into one process group (gloo on CPU, nccl on CUDA). Without those variables, or with one
process, nothing here does anything and every helper answers as for a single process."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as tdist
from torch import nn

from compress.errors import CompressError

# how long a process waits at a barrier for the others (rank 0 may hold the run lock behind another
# run, or export and benchmark alone, while the others wait)
TIMEOUT = datetime.timedelta(hours=float(os.environ.get("COMPRESS_DIST_TIMEOUT_HOURS", "12")))


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_world() -> int:
    """How many processes torchrun started (1 for a single process), before or after :func:`init`."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 for a single process), before or after :func:`init`."""
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world() -> int:
    return tdist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def backend(devices: list[str]) -> str:
    """The process-group backend for trainings on ``devices`` (each stage's ``device`` setting): nccl
    when every one runs on CUDA, gloo when none does, and both (gloo for CPU tensors, nccl for CUDA
    tensors) when the stages differ."""
    cuda = torch.cuda.is_available()
    on_cuda = {d in ("auto", "cuda") and cuda for d in devices or ["auto"]}
    if on_cuda == {True}:
        return "nccl"
    return "gloo" if on_cuda == {False} else "cpu:gloo,cuda:nccl"


def init(devices: list[str] | None = None) -> None:
    """Join the process group torchrun set up (no-op for a single process or when already joined),
    with the :func:`backend` of the training stages' ``devices``; a process that trains on CUDA
    takes its local GPU."""
    if not launched() or active():
        return
    chosen = backend(devices or ["auto"])
    if "nccl" in chosen:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(chosen, timeout=TIMEOUT)


def shutdown() -> None:
    if active():
        tdist.destroy_process_group()


def barrier() -> None:
    if active():
        tdist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (picklable objects)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks."""
    if not active():
        return list(values)
    on_gpu = tdist.get_backend() == "nccl"
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if on_gpu else "cpu")
    tdist.all_reduce(t)
    return t.cpu().tolist()


# -- training on several processes and on GPUs --------------------------------------------------------


@dataclass
class Options:
    """The recipe's ``compute`` section, handed over by the runner (plain values: this module sits
    below the recipe)."""

    sync_bn: bool | str = "auto"
    sync_bn_below: int = 32
    mixed_precision: str = "auto"
    channels_last: bool | str = "auto"


options = Options()


def configure(**values: Any) -> None:
    """Set :data:`options` for the trainings that follow (the runner calls it with ``compute``)."""
    global options
    options = Options(**values)


@dataclass(frozen=True)
class HardwarePlan:
    sync_bn: bool
    autocast_dtype: torch.dtype | None  # None: float32
    channels_last: bool


def hardware_plan(device: torch.device, per_process_batch: int) -> HardwarePlan:
    """What a training on ``device`` uses: SyncBatchNorm with several processes on CUDA (torch has it
    for GPUs only: on CPU each process normalizes its own share of the batch), autocast only on CUDA
    (a CPU trains in float32), channels-last memory on CUDA by default and on CPU when the recipe asks
    (oneDNN's NHWC kernels win or lose by model and size: ``benchmarks/memory_format.py``)."""
    cuda = device.type == "cuda"
    if active() and not cuda and options.sync_bn is True:
        raise CompressError("compute.sync_bn: torch runs SyncBatchNorm on CUDA only; on CPU set it to auto or "
                            "false (each process then normalizes its own share of the batch)")
    sync = active() and cuda and (options.sync_bn is True or (options.sync_bn == "auto"
                                                              and per_process_batch < options.sync_bn_below))
    dtype = None
    if cuda and options.mixed_precision != "off":
        bf16 = options.mixed_precision == "bf16" or (options.mixed_precision == "auto" and torch.cuda.is_bf16_supported())
        dtype = torch.bfloat16 if bf16 else torch.float16
    cl = options.channels_last is True or (cuda and options.channels_last == "auto")
    return HardwarePlan(sync, dtype, cl)


def effective(device_type: str, per_process_batch: int) -> dict:
    """The settings that change what a training computes here, for a stage's fingerprint: on CPU only
    channels-last memory, when asked for (it changes the order of float32 sums); empty for one CPU
    process by default (so its fingerprints are what they always were)."""
    out: dict = {"world": world()} if active() else {}
    plan = hardware_plan(torch.device(device_type), per_process_batch)
    if device_type == "cuda":
        out["sync_bn"] = plan.sync_bn
        out["autocast"] = str(plan.autocast_dtype).removeprefix("torch.") if plan.autocast_dtype else "off"
        out["channels_last"] = plan.channels_last
    elif plan.channels_last:
        out["channels_last"] = True
    return out


def data_parallel(model: torch.nn.Module, objective: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel (which starts every process from rank 0's weights),
    and what the objective trains besides it set to rank 0's values; ``model`` itself when alone."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    for t in objective.state_dict().values():
        tdist.broadcast(t, 0)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def average_gradients(objective: torch.nn.Module) -> None:
    """Average over the processes the gradients of what the objective trains besides the student
    (DistributedDataParallel averages the student's): one all-reduce of their concatenation."""
    if not active():
        return
    params = [p for p in objective.parameters() if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat)
    flat /= world()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).clone()
        offset += n


def sync_buffers(model: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics, quantizer ranges)."""
    if active():
        for b in model.buffers():
            tdist.broadcast(b, 0)


def sync_batchnorm(model: torch.nn.Module) -> Callable[[], None]:
    """Swap every BatchNorm of ``model`` for a synchronized one (timm's converter, which keeps the
    activation of timm's BatchNormAct2d); returns what puts the original layers back. The swapped
    layers share their parameters and statistics with the originals, so what is trained stays in
    the originals (and their hooks, which feature taps put there, survive)."""
    from timm.layers import convert_sync_batchnorm

    originals = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]
    for name, child in list(model.named_children()):
        setattr(model, name, convert_sync_batchnorm(child))

    def restore() -> None:
        for qualified, module in originals:
            parent, _, leaf = qualified.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, module)

    return restore
