"""onnxruntime CPU latency (warm-up, then timed runs: mean, p50, p90, p99) and file size."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from compress.errors import CompressError
from compress.evaluate import ort_session


def input_shape(session) -> list:
    return list(session.get_inputs()[0].shape)


def latency(path: Path, image_size: int | None = None, threads: int = 1, warmup: int = 10, runs: int = 100,
            batch: int = 1) -> dict:
    """Latency of one batch through onnxruntime's CPU provider; ``threads=0`` uses every core."""
    session = ort_session(path, threads=threads)
    shape = input_shape(session)
    fixed = [d if isinstance(d, int) else None for d in shape]
    size = image_size or fixed[-1]
    if size is None:
        raise CompressError(f"{path.name} has a dynamic spatial size; pass an image size")
    if fixed[-1] is not None and fixed[-1] != size:
        raise CompressError(f"{path.name} takes {fixed[-1]}x{fixed[-1]} inputs, not {size}x{size}")
    chans = fixed[1] or 3
    x = np.random.default_rng(0).standard_normal((batch, chans, size, size)).astype(np.float32)
    name = session.get_inputs()[0].name
    for _ in range(warmup):
        session.run(None, {name: x})
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        times[i] = time.perf_counter() - t0
    ms = times * 1000.0
    return {
        "image_size": size,
        "batch": batch,
        "threads": threads if threads > 0 else (os.cpu_count() or 1),
        "threads_setting": "1 thread" if threads == 1 else ("all cores" if threads == 0 else f"{threads} threads"),
        "runs": runs,
        "mean_ms": float(ms.mean()),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def file_size(path: Path) -> int:
    return Path(path).stat().st_size
