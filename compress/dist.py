"""Distributed training through torch.distributed, launched by torchrun.

``torchrun --nproc_per_node=N -m compress pipeline RECIPE`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environment; :func:`init` joins
them into one process group (gloo on CPU, nccl on CUDA). Without those variables, or with one
process, nothing here does anything and every helper answers as for a single process."""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as tdist

# how long a process waits at a barrier for the others (rank 0 may hold the run lock behind another
# run, or export and benchmark alone, while the others wait)
TIMEOUT = datetime.timedelta(hours=float(os.environ.get("COMPRESS_DIST_TIMEOUT_HOURS", "12")))


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


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


def init(device: str = "auto") -> None:
    """Join the process group torchrun set up (no-op for a single process or when already joined):
    nccl when CUDA is there and wanted, gloo otherwise; each process takes its local GPU."""
    if not launched() or active():
        return
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)


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
