"""A training step in channels-last (NHWC) memory against the default NCHW one, in one run, on CPU.

For each model and input size: the median time of a training step (forward, cross-entropy, backward,
SGD step) on one batch held in memory, and of a forward pass in eval mode (what a distilling teacher
does each step), once with the model and batch in the default memory format and once in
channels-last; the ratio NCHW / NHWC is the speed-up the training stages get from
``compute.channels_last`` (on by default). The two formats alternate step by step, so a change in the
machine's load falls on both.

    .venv/bin/python benchmarks/memory_format.py                      # mobilenetv2_100 and resnet18, 32/64/96 px
    .venv/bin/python benchmarks/memory_format.py --models shufflenet_v2_x1_0 --sizes 64 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from compress.models import create_model


def _step(model, opt, x, y, train: bool) -> float:
    t = time.perf_counter()
    if train:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    else:
        with torch.no_grad():
            model(x)
    return time.perf_counter() - t


def measure(name: str, size: int, batch: int, steps: int, train: bool) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    pairs = {}
    for fmt in ("nchw", "nhwc"):
        model = create_model(name, 10)
        xx = x
        if fmt == "nhwc":
            model = model.to(memory_format=torch.channels_last)
            xx = x.contiguous(memory_format=torch.channels_last)
        model.train(train)
        pairs[fmt] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), xx)
    times: dict = {"nchw": [], "nhwc": []}
    for i in range(steps + 2):  # two warm-up steps each
        for fmt, (model, opt, xx) in pairs.items():
            t = _step(model, opt, xx, y, train)
            if i >= 2:
                times[fmt].append(t)
    nchw, nhwc = statistics.median(times["nchw"]), statistics.median(times["nhwc"])
    return {"model": name, "size": size, "batch": batch, "mode": "train" if train else "eval",
            "nchw_s": nchw, "nhwc_s": nhwc, "speedup": nchw / nhwc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenetv2_100", "resnet18"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 96])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(m, s, args.batch, args.steps, train) for m in args.models for s in args.sizes
            for train in (True, False)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"| model | px | mode | NCHW s/step | NHWC s/step | NCHW / NHWC |  (batch {args.batch}, "
          f"{args.threads} threads, median of {args.steps})")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['size']} | {r['mode']} | {r['nchw_s']:.3f} | {r['nhwc_s']:.3f} | {r['speedup']:.2f} |")


if __name__ == "__main__":
    main()
