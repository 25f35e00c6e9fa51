"""Pruned against unpruned student: latency speedup ÷ MACs reduction, file size, measured in one run.

Exports the distilled and the pruned student of a finished pipeline run at the same input size and
times them with ``compress.bench.latency`` (onnxruntime, each measurement in a fresh process pinned to
as many cores as threads) in alternating rounds (best p50 over the rounds counts).

    .venv/bin/python benchmarks/prune_speedup.py artifacts/mobilenet            # 224x224, 1 thread

The goal for the default mobilenet recipe: speedup ÷ MACs reduction ≥ 0.6, file ≥ 40% smaller,
speedup ≥ 1.4.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from compress.bench import latency
from compress.errors import CompressError


def measure(run_dir: Path, size: int, threads: int, runs: int, rounds: int) -> dict:
    # torch and the models are imported here, not at the top: each latency() runs in a fresh "spawn"
    # process, which imports this script as its main module, and needs none of them
    from compress.export import export_onnx
    from compress.metrics import count_macs, count_params
    from compress.models import load_checkpoint

    models = {"unpruned": load_checkpoint(run_dir / "distill" / "model.safetensors")[0],
              "pruned": load_checkpoint(run_dir / "prune" / "model.safetensors")[0]}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {k: export_onnx(m, Path(tmp) / f"{k}.onnx", size) for k, m in models.items()}
        best = {k: float("inf") for k in paths}
        for _ in range(rounds):
            for k, p in paths.items():
                best[k] = min(best[k], latency(p, size, threads=threads, runs=runs)["p50_ms"])
        sizes = {k: p.stat().st_size for k, p in paths.items()}
    macs = {k: count_macs(m, size) for k, m in models.items()}
    speedup = best["unpruned"] / best["pruned"]
    macs_reduction = macs["unpruned"] / macs["pruned"]
    return {
        "setting": f"{size}x{size}, batch 1, {threads} thread(s), best p50 of {rounds} rounds x {runs} runs",
        "p50_ms": {k: round(v, 3) for k, v in best.items()},
        "macs": macs,
        "params": {k: count_params(m) for k, m in models.items()},
        "onnx_bytes": sizes,
        "latency_speedup": round(speedup, 3),
        "macs_reduction": round(macs_reduction, 3),
        "speedup_over_macs_reduction": round(speedup / macs_reduction, 3),
        "file_smaller_by": round(1 - sizes["pruned"] / sizes["unpruned"], 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, nargs="?", default=Path("artifacts/mobilenet"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    try:
        r = measure(args.run_dir, args.size, args.threads, args.runs, args.rounds)
    except CompressError as e:
        print(f"prune_speedup: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=2))
    ok = r["speedup_over_macs_reduction"] >= 0.6 and r["latency_speedup"] >= 1.4 and r["file_smaller_by"] >= 0.4
    print("goals met (speedup/MACs reduction >= 0.6, speedup >= 1.4, file >= 40% smaller)" if ok else "some goals MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
