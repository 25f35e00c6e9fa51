"""The runner: the run's context, stage fingerprints, skipping, resuming and atomic stage folders.

``artifacts/<run>/<stage>/`` is complete or absent: a stage writes into a hidden temporary folder that
is renamed into place when the stage succeeds. A stage whose fingerprint (its config, the data, the
seed and its upstream stages' fingerprints) is unchanged is skipped. Training checkpoints live in
``artifacts/<run>/.work/`` so a killed stage resumes where it stopped. ``stage.json`` records the
size and sha256 of every file of its folder; a skip checks them, so a damaged folder is recomputed,
not trusted. One process at a time runs a run folder (``artifacts/<run>/.lock``): a second one waits
for it. Every run appends its log to ``artifacts/<run>/run.log``. The runner knows stages only through
the registry and writes no report: whoever runs a pipeline hands ``compress.report`` in as ``finish``,
which runs while the run is still locked.

Under torchrun, every process runs the stages that train (the training loop is data parallel);
rank 0 alone decides what to skip, holds the lock, writes stage folders, ``run.log`` and the reports,
and runs the stages that do not train (export, bench) while the others wait at a barrier. The
others train into a scratch folder of their own that is thrown away, then read rank 0's results."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import torch

from compress import __version__, dist, stages
from compress.config import PipelineConfig
from compress.context import RunContext, StageResult, derive_settings, describe_derived
from compress.fsio import damage, locked, manifest, read_json, replace_dir, sha256_json, write_json
from compress.graph import FORMAT_VERSION, NODES
from compress.errors import CompressError, short
from compress.logs import FILE_ONLY, run_log
from compress.models import create_model, load_state_dict_file

log = logging.getLogger(__name__)


def fingerprint(ctx: RunContext, stage: stages.Stage) -> str:
    node = stage.node
    ident = {
        "stage": stage.name,
        "format": FORMAT_VERSION,
        "config": stage.config(ctx) if stage.config else getattr(ctx.cfg, stage.name).model_dump(mode="json"),
        "data": ctx.data_identity(),
        "seed": ctx.cfg.seed,
        "upstream": _upstream(ctx, stage),
    }
    if node.version != 1:
        ident["version"] = node.version
    if stage.identity is not None:
        ident["extra"] = stage.identity(ctx)
    if node.trains:  # several processes, or a GPU's autocast, compute something else than one CPU process
        from compress.train import pick_device

        device = pick_device(ctx.cfg.training_section(stage.name).device)
        compute = dist.effective(device.type, ctx.cfg.data.batch_size // dist.world())
        if compute:
            ident["compute"] = compute
    return sha256_json(ident)


def _upstream(ctx: RunContext, stage: stages.Stage) -> dict[str, str]:
    return {u: ctx.results[u].fingerprint for u in stage.node.reads if u in ctx.results}


RECORD = "stage.json"


def _reusable(out: Path, fp: str) -> tuple[bool, str | None]:
    """Whether the stage folder ``out`` holds a finished stage with fingerprint ``fp`` and every file
    as it was written; else why not (None: nothing to say, the folder is absent or the stage changed)."""
    record = out / RECORD
    if not record.is_file():
        return False, "stage folder has no stage.json" if out.is_dir() else None
    try:
        saved = read_json(record)
        files = saved.get("files")
    except (ValueError, AttributeError):
        return False, "stage.json cannot be read"
    if saved.get("fingerprint") != fp:
        return False, None
    if not isinstance(files, dict) or not files:
        return False, "stage.json records no file hashes (written by an older compress)"
    try:
        why = damage(out, files)
    except (TypeError, KeyError, AttributeError):
        why = "stage.json's file list cannot be read"
    return why is None, why and f"stage folder damaged: {why}"


def run_stage(ctx: RunContext, stage: stages.Stage) -> StageResult:
    fp = fingerprint(ctx, stage)
    out = ctx.stage_dir(stage.name)
    work = ctx.run_dir / ".work" / f"{stage.name}-{fp[:16]}"
    if not dist.is_main():
        return _run_stage_beside(ctx, stage, fp, out, work)
    reuse = False
    if not ctx.force:
        reuse, why = _reusable(out, fp)
        if not reuse and why:
            log.warning(f"[{stage.name}] {why}; recomputing")
    if stage.node.trains:
        dist.broadcast(reuse)
    if reuse:
        log.info(f"[{stage.name}] unchanged, skipped")
        if work.exists():  # left by a run killed after the stage's folder was in place
            shutil.rmtree(work, ignore_errors=True)
        result = StageResult(stage.name, out, fp, read_json(out / "metrics.json"), skipped=True)
    else:
        result = _run_into(ctx, stage, fp, out, work)
    dist.barrier()  # the others read the stage folder now
    return result


def _run_into(ctx: RunContext, stage: stages.Stage, fp: str, out: Path, work: Path) -> StageResult:
    tmp = ctx.run_dir / f".tmp-{stage.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if ctx.force and work.exists():
        shutil.rmtree(work)
    log.info(f"[{stage.name}] running")
    t0 = time.perf_counter()
    try:
        metrics = stage.run(ctx, tmp, work)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    metrics["stage_seconds"] = round(time.perf_counter() - t0, 2)
    if dist.active():
        metrics["processes"] = dist.world()
    write_json(tmp / "metrics.json", metrics)
    write_json(tmp / "config.json", ctx.cfg.model_dump(mode="json"))
    write_json(tmp / RECORD, {"stage": stage.name, "fingerprint": fp, "compress_version": __version__,
                              "upstream": _upstream(ctx, stage), "files": manifest(tmp, exclude=(RECORD,))})
    replace_dir(tmp, out)
    if work.exists():
        shutil.rmtree(work)
    log.info(f"[{stage.name}] done in {metrics['stage_seconds']:.1f}s")
    return StageResult(stage.name, out, fp, metrics)


def _run_stage_beside(ctx: RunContext, stage: stages.Stage, fp: str, out: Path, work: Path) -> StageResult:
    """A stage on a process other than rank 0: train beside rank 0 into a scratch folder when the
    stage trains and rank 0 does not skip it, then take rank 0's finished stage folder."""
    if stage.node.trains and not dist.broadcast(None):
        # in the run folder, so that rank 0 clears it (a ``.tmp-*`` leftover) if this process is killed
        with tempfile.TemporaryDirectory(prefix=f".tmp-{stage.name}-rank{dist.rank()}-", dir=ctx.run_dir) as scratch:
            stage.run(ctx, Path(scratch), work)
    dist.barrier()
    return StageResult(stage.name, out, fp, read_json(out / "metrics.json"), skipped=True)


def check_processes(cfg: PipelineConfig, processes: int) -> None:
    """Refuse a recipe that cannot run under ``processes`` torchrun processes, before any of them
    starts a stage: every training stage splits ``data.batch_size`` evenly over the processes."""
    trains = [s for s in cfg.stages if NODES[s].trains]
    if processes > 1 and trains and cfg.compute.sync_bn is True:
        from compress.train import pick_device

        on_cpu = [s for s in trains if pick_device(cfg.training_section(s).device).type != "cuda"]
        if on_cpu:
            raise CompressError(f"compute.sync_bn: torch runs SyncBatchNorm on CUDA only, and stages "
                                f"{', '.join(on_cpu)} train on the CPU here; set it to auto or false")
    if processes > 1 and trains and cfg.data.batch_size % processes:
        raise CompressError(f"data.batch_size {cfg.data.batch_size} does not split evenly over {processes} "
                            f"processes (stages {', '.join(trains)} train on it); use a multiple of {processes} "
                            f"(--set data.batch_size={cfg.data.batch_size // processes * processes or processes}) "
                            "or another number of processes")


def preflight(ctx: RunContext) -> None:
    """Check what the user handed in before any stage starts: the data loads, a teacher checkpoint
    exists and holds tensors, pretrained weights are there and fit their model, and each model runs
    on the data's images and survives what the recipe's stages will do to it (:func:`probe`). Bad
    input then fails with one line and nothing written."""
    cfg = ctx.cfg
    _ = ctx.data
    if cfg.teacher.checkpoint and "teacher" in cfg.stages:
        load_state_dict_file(Path(cfg.teacher.checkpoint).expanduser())
    probe(ctx)


def probe(ctx: RunContext) -> None:
    """Build every model of the run (with its pretrained weights, so a file that does not fit or a
    fetch that needs the network fails now), run each on two images of the data's size, and hand the
    student to the probe of each stage that changes it (pruning, QAT) on a copy. A failure is one line
    that says which stage to leave out."""
    cfg, data = ctx.cfg, ctx.data
    plan = [stages.get(s) for s in cfg.stages]
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning's and the tracers' notes on a throwaway copy
        student, name = None, ""
        for role, model_name, pretrained in [m for stage in plan if stage.models for m in stage.models(ctx)]:
            model = create_model(model_name, data.num_classes, pretrained=pretrained)
            _runs(role, model_name, model, data.image_size, data.num_classes)
            if role == "student":
                student, name = model, model_name
        if student is None:
            return
        failed: list[tuple[str, str]] = []
        for stage in plan:
            if stage.probe is None:
                continue
            t0 = time.perf_counter()
            try:
                student = stage.probe(ctx, student)
            except Exception as e:  # noqa: BLE001 - what the stage would meet hours later, now in one line
                log.debug(f"probe of stage {stage.name} failed", exc_info=True)
                why = short(e, 200, typed=not isinstance(e, CompressError))
                failed.append((stage.name, f"cannot be {stage.probe_does} ({why})"))
            log.debug(f"probe of stage {stage.name}: {time.perf_counter() - t0:.2f}s")
    if failed:
        names = [f for f, _ in failed]
        keep = [s for s in cfg.stages if s not in names and s != "assistant"]  # assistant is added by itself
        raise CompressError(f"student {name} " + "; it ".join(why for _, why in failed)
                            + f"; remove {' and '.join(repr(n) for n in names)} from stages "
                            f"(--set 'stages=[{','.join(keep)}]')")


def _runs(role: str, name: str, model: torch.nn.Module, size: int, num_classes: int) -> None:
    """One training-mode and one inference forward pass on two images return (2, num_classes) logits."""
    x = torch.randn(2, 3, size, size)
    try:
        for training in (True, False):
            model.train(training)
            with torch.no_grad():
                out = model(x)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"{'training' if training else 'inference'} forward returns {got}, "
                                 f"not logits of shape (2, {num_classes})")
    except Exception as e:  # noqa: BLE001
        raise CompressError(f"{role} {name} does not run on {size}×{size} images ({short(e, 140)}); "
                            "choose another model or data.image_size") from None
    finally:
        model.eval()


def run_pipeline(cfg: PipelineConfig, artifacts: Path = Path("artifacts"), force: bool = False,
                 cache_dir: Path | None = None, *, lock_timeout: float | None = None,
                 finish: Callable[[RunContext], None] | None = None, withhold_test: bool = False,
                 epoch_hooks: dict[str, Callable[[int, dict], None]] | None = None) -> RunContext:
    """Run the recipe's stages in order into ``artifacts/<name>/``; returns the context with every
    stage's result. The run folder is locked while the stages and ``finish`` (the caller's reports)
    run: another process running the same name waits for it, at most ``lock_timeout`` seconds when
    given (0: it refuses at once). ``withhold_test``: the test split is never read (a tuning trial);
    ``epoch_hooks``: per stage, ``hook(epoch, row)`` called after each of its validated epochs (a
    tuner's pruner)."""
    run_dir = artifacts / cfg.name
    ctx = RunContext(cfg=cfg, run_dir=run_dir, cache_dir=cache_dir or artifacts / ".cache", force=force,
                     withhold_test=withhold_test, epoch_hooks=epoch_hooks or {})
    check_processes(cfg, dist.world())
    dist.configure(**cfg.compute.model_dump())
    preflight(ctx)
    derived = derive_settings(ctx)
    plan = [stages.get(name) for name in cfg.stages]
    main = dist.is_main()
    with run_lock(run_dir, cfg.name, lock_timeout) if main else nullcontext():
        dist.barrier()  # rank 0 holds the run folder
        with run_log(run_dir / "run.log") if main else nullcontext():
            log.debug(f"run {cfg.name}: compress {__version__}, stages {' -> '.join(cfg.stages)}, force {force}"
                      + (f", {dist.world()} processes" if dist.active() else ""))
            if derived:
                log.info("derived from the data: " + "; ".join(describe_derived(derived)))
            try:
                for stage in plan:
                    ctx.results[stage.name] = run_stage(ctx, stage)
            except BaseException as e:  # the console gets the CLI's one line; run.log keeps the whole story
                log.error(f"run stopped: {short(e)}", exc_info=True, extra={FILE_ONLY: True})
                raise
        if finish is not None and main:
            finish(ctx)
    return ctx


LOCK = ".lock"


@contextmanager
def run_lock(run_dir: Path, name: str, timeout: float | None = None) -> Iterator[None]:
    """Hold ``run_dir/.lock`` while the block runs (another process holding it: wait, see
    :func:`compress.fsio.locked`), and clear what a killed run left in ``run_dir``: unfinished stage
    folders (``.tmp-*``), replaced ones (``.*.old``) and unfinished files (``.*.tmp``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with locked(run_dir / LOCK, f"run {name}", timeout,
                hint="; wait for it, or run under another --name"):
        _clear_leftovers(run_dir)
        yield


def _clear_leftovers(run_dir: Path) -> None:
    for p in run_dir.iterdir():
        name = p.name
        if p.is_dir() and not p.is_symlink() and (name.startswith(".tmp-") or (name[:1] == "." and name.endswith(".old"))):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and name[:1] == "." and name.endswith(".tmp"):
            p.unlink(missing_ok=True)
        else:
            continue
        log.debug(f"removed {p}, left by an interrupted run")
