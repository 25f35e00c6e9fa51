"""The data pipeline against the training step it feeds: images/s of each, measured alone, in one run.

Writes a folder of 224-px JPEGs (two classes of smooth random colour fields with noise), loads it the
way ``compress pipeline`` does (``imagefolder:``, timm's training transform: random-resized crop,
flip, colour jitter; decoding in DataLoader workers, persistent, per-sample seeds), and times

- the data pipeline alone: training batches per second, with the default workers (the machine's
  cores) and with none (decoding in the training process);
- a training step of the student alone (forward, backward, SGD step) on batches already in memory.

    .venv/bin/python benchmarks/data_throughput.py                       # mobilenetv2_100, 224x224
    .venv/bin/python benchmarks/data_throughput.py --model resnet18 --images 512 --json

The goal: the pipeline with workers delivers at least 3x the images/s the training step consumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from compress.data import DataConfig, load_data
from compress.evaluate import TrainLoader
from compress.models import create_model


def write_jpegs(folder: Path, count: int, size: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        cls = folder / f"class{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
        noisy = np.clip(field + rng.integers(-20, 21, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(cls / f"{i}.jpg", quality=90)


def data_rate(folder: Path, size: int, batch: int, workers: int | None, epochs: int) -> float:
    """Training images per second delivered by the data pipeline alone (the first epoch, which starts
    the workers, is not timed)."""
    cfg = DataConfig(dataset=f"imagefolder:{folder}", image_size=size, batch_size=batch, workers=workers,
                     val_fraction=0.05, test_fraction=0.05)
    train = load_data(cfg).train
    feed = TrainLoader(train, batch)
    try:
        for _ in feed.epoch(0):
            pass
        seen, t0 = 0, time.perf_counter()
        for e in range(1, epochs + 1):
            for x, _ in feed.epoch(e):
                seen += len(x)
        return seen / (time.perf_counter() - t0)
    finally:
        feed.close()


def step_rate(model_name: str, size: int, batch: int, steps: int) -> float:
    """Images per second a training step of ``model_name`` consumes (batches already in memory)."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=2).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenetv2_100")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=384, help="JPEGs written")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2, help="timed passes over the images")
    ap.add_argument("--steps", type=int, default=4, help="timed training steps")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpegs"
        write_jpegs(folder, a.images, a.size)
        workers = DataConfig().num_workers()
        with_workers = data_rate(folder, a.size, a.batch, None, a.epochs)
        in_process = data_rate(folder, a.size, a.batch, 0, a.epochs)
    train = step_rate(a.model, a.size, a.batch, a.steps)
    result = {"model": a.model, "size": a.size, "batch": a.batch, "workers": workers,
              "data_images_per_s": round(with_workers, 1), "data_images_per_s_no_workers": round(in_process, 1),
              "train_images_per_s": round(train, 1), "ratio": round(with_workers / train, 2),
              "goal": ">= 3", "met": with_workers / train >= 3}
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"data pipeline, {workers} workers: {with_workers:8.1f} images/s   (no workers: {in_process:.1f})")
        print(f"training step, {a.model} at {a.size}: {train:8.1f} images/s")
        print(f"ratio {result['ratio']:.2f} (goal >= 3): {'met' if result['met'] else 'NOT met'}")
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
