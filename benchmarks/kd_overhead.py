"""What distillation adds to a training epoch, with the live teacher and with the teacher-output cache,
as ratios to a from-scratch epoch measured in one run.

Trains the student on digits (32 px, batch 64) one epoch at a time with the pipeline's training loop
(``compress.train.fit``: the epoch, its validation pass and its checkpoint, as a stage's
``seconds_per_epoch`` counts them), four ways:

- scratch: cross-entropy on the labels, no teacher;
- KD, live teacher: Hinton KD with the teacher's forward pass on every batch (``teacher_cache: false``);
- KD, cold cache: the same, the teacher's logits stored as they are computed (the first run of a sweep);
- KD, warm cache: the logits read back, no teacher forward (every later run).

The teacher is randomly initialized: its weights do not change what its forward pass costs. Each round
runs the four in turn, so drift on a shared machine hits them alike; the best epoch of each is kept.

    .venv/bin/python benchmarks/kd_overhead.py                          # mobilenetv2_050 from resnet18
    .venv/bin/python benchmarks/kd_overhead.py --rounds 5 --json

The goal: a KD epoch with the warm cache costs at most 1.10x a from-scratch epoch (the live teacher's
ratio is printed beside it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from compress.data import DataConfig, load_data
from compress.distill import build_method
from compress.distill.cache import TeacherLogitCache
from compress.models import create_model
from compress.train import TrainConfig, fit, seed_everything

GOAL = 1.10


def epoch_seconds(data, student_name: str, teacher: torch.nn.Module | None, work: Path,
                  cache: TeacherLogitCache | None = None) -> float:
    """Seconds of one training epoch of a fresh student: scratch without ``teacher``, else Hinton KD
    (through ``cache`` when given)."""
    seed_everything(0)
    student = create_model(student_name, data.num_classes)
    objective = build_method("kd" if teacher is not None else "scratch")
    objective.bind(student, [teacher] if teacher is not None else [], image_size=data.image_size)
    if cache is not None:
        objective.use_teacher_cache([cache])
    cfg = TrainConfig(epochs=1, lr=0.05, warmup_epochs=0)
    return fit(student, data.train, data.val, cfg, objective, work, seed=0, batch_size=64).seconds


def measure(student: str, teacher_name: str, size: int, rounds: int) -> dict:
    data = load_data(DataConfig(dataset="digits", image_size=size, batch_size=64))
    seed_everything(1)
    teacher = create_model(teacher_name, data.num_classes).eval()
    times: dict[str, list[float]] = {"scratch": [], "kd_live": [], "kd_cold_cache": [], "kd_warm_cache": []}
    warm_steps = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            work = Path(tmp) / f"round{r}"
            entry = work / "cache"  # empty each round: the cold run fills it, the warm run reads it
            times["scratch"].append(epoch_seconds(data, student, None, work / "scratch"))
            times["kd_live"].append(epoch_seconds(data, student, teacher, work / "live"))
            times["kd_cold_cache"].append(epoch_seconds(data, student, teacher, work / "cold", TeacherLogitCache(entry)))
            warm = TeacherLogitCache(entry)
            times["kd_warm_cache"].append(epoch_seconds(data, student, teacher, work / "warm", warm))
            if warm.stats["steps_computed"] or warm.stats["fell_back"]:
                raise SystemExit(f"the warm run did not read every step from the cache: {warm.stats}")
            warm_steps = warm.stats["steps_read"]
    best = {k: min(v) for k, v in times.items()}
    live, cached = best["kd_live"] / best["scratch"], best["kd_warm_cache"] / best["scratch"]
    return {"student": student, "teacher": teacher_name, "size": size, "batch": 64, "train_images": len(data.train),
            "steps_per_epoch": warm_steps, "threads": torch.get_num_threads(), "rounds": rounds,
            "seconds_per_epoch": {k: round(v, 3) for k, v in best.items()},
            "kd_over_scratch_live": round(live, 3), "kd_over_scratch_cached": round(cached, 3),
            "kd_over_scratch_cold_cache": round(best["kd_cold_cache"] / best["scratch"], 3),
            "goal": f"<= {GOAL}", "met": cached <= GOAL}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default="mobilenetv2_050")
    ap.add_argument("--teacher", default="resnet18")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    result = measure(a.student, a.teacher, a.size, a.rounds)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        s = result["seconds_per_epoch"]
        print(f"{a.student} from {a.teacher}, digits at {a.size} px, batch 64, {result['train_images']} training "
              f"images, {result['threads']} threads; seconds per epoch, best of {a.rounds} rounds:")
        for name, label in (("scratch", "scratch"), ("kd_live", "KD, live teacher"),
                            ("kd_cold_cache", "KD, cold cache (computing and storing)"),
                            ("kd_warm_cache", "KD, warm cache")):
            print(f"  {label:40s} {s[name]:7.3f}")
        print(f"KD epoch / scratch epoch: live teacher {result['kd_over_scratch_live']:.3f}, "
              f"cold cache {result['kd_over_scratch_cold_cache']:.3f}, warm cache {result['kd_over_scratch_cached']:.3f} "
              f"(goal <= {GOAL}): {'met' if result['met'] else 'NOT met'}")
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
