"""Data-parallel training on CPU: training images/s with 1 process and with N processes (torchrun,
gloo), measured in one run.

Each setting trains the same student on digits through compress's one training loop (``fit``) with
the same global batch, in a fresh process group started by torchrun; the best epoch after the first
counts (the first pays start-up). The cores are split evenly: one process gets every core as
threads, N processes get cores/N threads each.

    .venv/bin/python benchmarks/ddp_scaling.py                       # mobilenetv2_050, 1 and 2 processes
    .venv/bin/python benchmarks/ddp_scaling.py --model resnet18 --processes 1 2 --epochs 4 --json

It prints images/s per setting and the speed-up over one process. On one machine, processes pay
gradient all-reduces that threads do not, so their gain comes where one process cannot keep every
core busy (small convolutions, Python overhead). Between machines, only processes scale.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One process of a setting: train, and (rank 0) write the per-epoch seconds to ``args.out``."""
    import torch

    from compress import dist
    from compress.data import DataConfig, load_data
    from compress.distill import build_method
    from compress.models import create_model
    from compress.train import TrainConfig, fit

    torch.set_num_threads(args.threads)
    dist.init("cpu")
    data = load_data(DataConfig(dataset="digits", image_size=args.size, batch_size=args.batch))
    model = create_model(args.model, data.num_classes)
    objective = build_method("scratch").bind(model, [], image_size=args.size)
    stamps: list[float] = []
    cfg = TrainConfig(epochs=args.epochs, lr=0.05, device="cpu")
    with tempfile.TemporaryDirectory() as work:
        fit(model, data.train, data.val, cfg, objective, Path(work), seed=0, batch_size=args.batch,
            desc=f"{args.model} x{dist.world()}", on_epoch_start=lambda e: stamps.append(time.perf_counter()),
            on_epoch_end=lambda e, row: stamps.append(time.perf_counter()))
    if dist.is_main():
        seconds = [stamps[i + 1] - stamps[i] for i in range(0, len(stamps), 2)]
        Path(args.out).write_text(json.dumps({"epoch_seconds": seconds, "images": len(data.train)}))
    dist.shutdown()


def run_setting(args: argparse.Namespace, processes: int, cores: int) -> dict:
    threads = max(1, cores // processes)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [__file__, "--worker", "--out", str(out), "--model", args.model, "--size", str(args.size),
               "--batch", str(args.batch), "--epochs", str(args.epochs), "--threads", str(threads)]
        launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                  if processes > 1 else [sys.executable])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        subprocess.run(launch + cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        result = json.loads(out.read_text())
    best = min(result["epoch_seconds"][1:] or result["epoch_seconds"])
    return {"processes": processes, "threads_per_process": threads, "best_epoch_seconds": round(best, 3),
            "images_per_second": round(result["images"] / best, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenetv2_050")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64, help="global batch")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    cores = len(os.sched_getaffinity(0))
    rows = [run_setting(args, n, cores) for n in args.processes]
    base = rows[0]["images_per_second"]
    for r in rows:
        r["speedup_over_first"] = round(r["images_per_second"] / base, 3)
    if args.json:
        print(json.dumps({"model": args.model, "cores": cores, "global_batch": args.batch, "rows": rows}, indent=2))
    else:
        print(f"{args.model}, digits {args.size}x{args.size}, global batch {args.batch}, {cores} cores")
        print(f"{'processes':>9s} {'threads each':>12s} {'images/s':>9s} {'speed-up':>8s}")
        for r in rows:
            print(f"{r['processes']:9d} {r['threads_per_process']:12d} {r['images_per_second']:9.1f} "
                  f"{r['speedup_over_first']:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
