"""Student-vs-teacher speed and size as ratios measured in one run.

Exports both checkpoints of a finished pipeline run at the requested input size, then times them with
``compress.bench.latency`` (onnxruntime, each measurement in a fresh process pinned to as many cores as
threads) in alternating rounds (so drift on a shared machine hits both alike) and prints the ratios.

    .venv/bin/python benchmarks/student_vs_teacher.py artifacts/mobilenet --size 224 --threads 1
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

    models = {role: load_checkpoint(run_dir / stage / "model.safetensors")
              for role, stage in (("teacher", "teacher"), ("student", "distill"))}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {role: export_onnx(m, Path(tmp) / f"{role}.onnx", size) for role, (m, _) in models.items()}
        p50 = {role: [] for role in paths}
        for _ in range(rounds):
            for role, path in paths.items():
                p50[role].append(latency(path, size, threads=threads, runs=runs)["p50_ms"])
        sizes = {role: path.stat().st_size for role, path in paths.items()}
    best = {role: min(v) for role, v in p50.items()}
    macs = {role: count_macs(m, size) for role, (m, _) in models.items()}
    params = {role: count_params(m) for role, (m, _) in models.items()}
    return {
        "size": size, "threads": threads, "runs_per_round": runs, "rounds": rounds,
        "p50_ms": best, "onnx_bytes": sizes, "macs": macs, "params": params,
        "speedup_teacher_over_student": best["teacher"] / best["student"],
        "size_ratio_student_over_teacher": sizes["student"] / sizes["teacher"],
        "macs_ratio_teacher_over_student": macs["teacher"] / macs["student"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    try:
        print(json.dumps(measure(args.run_dir, args.size, args.threads, args.runs, args.rounds), indent=2))
    except CompressError as e:
        print(f"student_vs_teacher: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
