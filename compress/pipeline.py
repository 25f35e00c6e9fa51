"""Stage order, skipping, the artifacts layout and the run's report.

``artifacts/<run>/<stage>/`` is complete or absent: a stage writes into a hidden temporary folder that
is renamed into place when the stage succeeds. A stage whose fingerprint (its config, the data, the
seed and its upstream stages' fingerprints) is unchanged is skipped. Training checkpoints live in
``artifacts/<run>/.work/`` so a killed stage resumes where it stopped."""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from compress import __version__
from compress.config import PipelineConfig
from compress.data import DataBundle, data_identity, load_data
from compress.fsio import read_json, replace_dir, sha256_json, write_json

# Bump when the layout or meaning of a stage's outputs changes, so old folders are recomputed.
FORMAT_VERSION = 1


@dataclass
class StageResult:
    name: str
    dir: Path
    fingerprint: str
    metrics: dict
    skipped: bool = False


@dataclass
class RunContext:
    cfg: PipelineConfig
    run_dir: Path
    cache_dir: Path
    force: bool = False
    results: dict[str, StageResult] = field(default_factory=dict)
    _data: DataBundle | None = None

    @property
    def data(self) -> DataBundle:
        if self._data is None:
            self._data = load_data(self.cfg.data)
        return self._data

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunContext, Path, Path], dict]  # (ctx, out_dir, work_dir) -> metrics
    upstream: tuple[str, ...]
    extra_identity: Callable[[RunContext], dict] | None = None
    version: int = 1  # bump when the stage's code changes what it writes
    config: Callable[[RunContext], dict] | None = None  # default: the recipe section named like the stage


STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage) -> None:
    STAGES[stage.name] = stage


def fingerprint(ctx: RunContext, stage: Stage) -> str:
    ident = {
        "stage": stage.name,
        "format": FORMAT_VERSION,
        "config": stage.config(ctx) if stage.config else getattr(ctx.cfg, stage.name).model_dump(mode="json"),
        "data": data_identity(ctx.cfg.data),
        "seed": ctx.cfg.seed,
        "upstream": {u: ctx.results[u].fingerprint for u in stage.upstream if u in ctx.results},
    }
    if stage.version != 1:
        ident["version"] = stage.version
    if stage.extra_identity is not None:
        ident["extra"] = stage.extra_identity(ctx)
    return sha256_json(ident)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_stage(ctx: RunContext, stage: Stage) -> StageResult:
    fp = fingerprint(ctx, stage)
    out = ctx.stage_dir(stage.name)
    record = out / "stage.json"
    if not ctx.force and record.is_file():
        try:
            saved = read_json(record)
        except ValueError:
            saved = {}
        if saved.get("fingerprint") == fp:
            log(f"[{stage.name}] unchanged, skipped")
            return StageResult(stage.name, out, fp, read_json(out / "metrics.json"), skipped=True)
    tmp = ctx.run_dir / f".tmp-{stage.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    work = ctx.run_dir / ".work" / f"{stage.name}-{fp[:16]}"
    if ctx.force and work.exists():
        shutil.rmtree(work)
    log(f"[{stage.name}] running")
    t0 = time.perf_counter()
    try:
        metrics = stage.run(ctx, tmp, work)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    metrics["stage_seconds"] = round(time.perf_counter() - t0, 2)
    write_json(tmp / "metrics.json", metrics)
    write_json(tmp / "config.json", ctx.cfg.model_dump(mode="json"))
    write_json(tmp / "stage.json", {"stage": stage.name, "fingerprint": fp, "compress_version": __version__,
                                    "upstream": {u: ctx.results[u].fingerprint for u in stage.upstream if u in ctx.results}})
    replace_dir(tmp, out)
    if work.exists():
        shutil.rmtree(work)
    log(f"[{stage.name}] done in {metrics['stage_seconds']:.1f}s")
    return StageResult(stage.name, out, fp, metrics)


def preflight(ctx: RunContext) -> None:
    """Check what the user handed in before any stage starts: the data loads, a teacher checkpoint
    exists and holds tensors. Bad input then fails with one line and nothing written."""
    from compress.models import load_state_dict_file

    _ = ctx.data
    if ctx.cfg.teacher.checkpoint and "teacher" in ctx.cfg.stages:
        load_state_dict_file(Path(ctx.cfg.teacher.checkpoint).expanduser())


def run_pipeline(cfg: PipelineConfig, artifacts: Path = Path("artifacts"), force: bool = False,
                 cache_dir: Path | None = None) -> RunContext:
    from compress import report, stages  # noqa: F401  (registers the stages)

    run_dir = artifacts / cfg.name
    ctx = RunContext(cfg=cfg, run_dir=run_dir, cache_dir=cache_dir or artifacts / ".cache", force=force)
    preflight(ctx)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in cfg.stages:
        ctx.results[name] = run_stage(ctx, STAGES[name])
    report.write_reports(ctx)
    return ctx
