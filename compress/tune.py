"""``compress tune``: the settings that matter, searched on the validation split with Optuna.

One study per tuned stage (``tune.stages``, teacher first): each trial is a pipeline run of the stages
up to it (``<artifacts>/<run>/tune/runs/<trial>/``), with the trial's settings on top of the recipe and
of what earlier studies chose; its value is the validation accuracy of the weights the stage keeps.
The test split is withheld from every trial (reading it raises). A sampler (TPE, seeded) proposes the
settings and a pruner (successive halving or Hyperband) stops a trial whose validation accuracy at an
epoch falls behind the others'. Trials live in Optuna's RDB storage (SQLite under the run's tune
folder by default), so a killed search continues with the same command: the trial it was running is
run again with the same settings, and the next proposals are the ones an uninterrupted search makes
(the sampler is seeded by the number of finished trials). A PostgreSQL or MySQL URL in
``tune.storage`` lets several machines work on one study: each runs the same command. Trials of the
student read the teacher-output cache that its first trial fills (same teacher, data, seed and batch
plan), and a teacher trial that finishes is stored in the trained-teacher cache, so the pipeline that
follows reuses the chosen teacher."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from compress.config import TUNE_SECTIONS, PipelineConfig, SearchRange, validate_recipe
from compress.errors import CompressError, ConfigError
from compress.fsio import sha256_json, write_json
from compress.pipeline import run_lock, run_pipeline

log = logging.getLogger(__name__)

#: what a trial of each study runs
STUDY_STAGES = {"teacher": ["teacher"], "distill": ["teacher", "distill"]}
RECORD = "tune.json"


def tune_folder(cfg: PipelineConfig, artifacts: Path) -> Path:
    return artifacts / cfg.name / "tune"


def with_settings(cfg: PipelineConfig, settings: dict, **top) -> PipelineConfig:
    """``cfg`` with ``settings`` (``section.key`` -> value) and top-level fields ``top`` set, validated."""
    raw = cfg.model_dump(mode="json")
    for key, value in settings.items():
        section, field = key.split(".", 1)
        raw[section][field] = value
    raw.update(top)
    return validate_recipe(raw, "tuned settings")


def run_tune(cfg: PipelineConfig, artifacts: Path = Path("artifacts"), force: bool = False) -> dict:
    """Run (or continue) every study of ``cfg.tune``; returns and stores (``tune/tune.json``) the
    chosen settings and each study's trials."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise CompressError("tuning needs optuna: pip install optuna") from None
    folder = tune_folder(cfg, artifacts)
    chosen: dict = {}
    studies = []
    with run_lock(folder, f"{cfg.name} tuning"):
        for name in cfg.tune.stages:
            result = _study(cfg, name, chosen, folder, artifacts, force)
            chosen.update(result["best_params"])
            studies.append(result)
        record = {"settings": chosen, "studies": studies}
        write_json(folder / RECORD, record)
    log.info("[tune] chosen on the validation split: " + ", ".join(f"{k}={_fmt(v)}" for k, v in chosen.items()))
    return record


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def study_key(cfg: PipelineConfig, name: str, fixed: dict) -> str:
    """What a study's trials depend on: the recipe sections they read, the seed, the settings earlier
    studies chose and the search space (not the budget: a larger one continues the same study)."""
    sections = sorted({"data", "compute", *TUNE_SECTIONS[name], *(["teacher"] if name == "distill" else [])})
    t = cfg.tune
    return sha256_json({"study": name, "seed": cfg.seed, "fixed": fixed,
                        "sections": {s: getattr(cfg, s).model_dump(mode="json") for s in sections},
                        "space": {k: r.model_dump(mode="json") for k, r in t.space_of(name).items()},
                        "sampler": t.sampler, "pruner": t.pruner, "startup": t.startup_trials})[:12]


def _storage(cfg: PipelineConfig, folder: Path):
    import optuna

    if cfg.tune.storage:  # shared by several machines: a trial whose machine stops beating is retried
        from optuna.storages import RetryFailedTrialCallback

        return optuna.storages.RDBStorage(cfg.tune.storage, heartbeat_interval=60, grace_period=180,
                                          failed_trial_callback=RetryFailedTrialCallback(max_retry=2)), False
    folder.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(f"sqlite:///{(folder / 'study.db').resolve()}"), True


def _sampler(cfg: PipelineConfig, seed: int):
    import optuna

    if cfg.tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.tune.startup_trials)


def _pruner(cfg: PipelineConfig):
    import optuna

    return {"successive_halving": optuna.pruners.SuccessiveHalvingPruner,
            "hyperband": optuna.pruners.HyperbandPruner,
            "none": optuna.pruners.NopPruner}[cfg.tune.pruner]()


def _suggest(trial, key: str, r: SearchRange):
    if r.choices is not None:
        return trial.suggest_categorical(key, r.choices)
    if r.integer:
        return trial.suggest_int(key, int(r.low), int(r.high), log=r.log)
    return trial.suggest_float(key, r.low, r.high, log=r.log)


def _study(cfg: PipelineConfig, name: str, fixed: dict, folder: Path, artifacts: Path, force: bool) -> dict:
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t = cfg.tune
    space = t.space_of(name)
    if not t.space.get(name) and not cfg.data.dataset.startswith("imagefolder:"):
        # the crop and jitter of the default space act on image folders only (digits and CIFAR shift)
        space = {k: r for k, r in space.items() if not k.startswith("data.")}
    base = with_settings(cfg, fixed)
    for key in space:  # every key names a recipe setting: refused now, not in the first trial
        section, field = key.split(".", 1)
        if field not in type(getattr(base, section)).model_fields:
            raise ConfigError(f"tune.space.{name}.{key}: {section} has no setting {field!r}")
    storage, local = _storage(cfg, folder)
    study_name = f"{cfg.name}-{name}-{study_key(cfg, name, fixed)}"
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize", load_if_exists=True)
    if force:  # start the study over
        optuna.delete_study(study_name=study_name, storage=storage)
        study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize")
    if local:  # this process holds the tune folder: a trial still running was cut off; run it again
        for tr in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            log.info(f"[tune] {name} trial {tr.number} was interrupted; running its settings again")
            study.tell(tr.number, state=TrialState.FAIL)
            study.enqueue_trial(tr.params)
    runs = folder / "runs"
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    spent = sum(tr.user_attrs.get("seconds", 0.0) for tr in study.get_trials(deepcopy=False))
    t0 = time.monotonic()
    while True:
        done = study.get_trials(deepcopy=False, states=finished)
        elapsed = spent + time.monotonic() - t0
        if (t.trials is not None and len(done) >= t.trials) or (t.minutes is not None and elapsed >= 60 * t.minutes):
            break
        # a sampler seeded by the number of finished trials: a resumed search proposes what an
        # uninterrupted one does
        study = optuna.load_study(study_name=study_name, storage=storage,
                                  sampler=_sampler(cfg, cfg.seed + len(done)), pruner=_pruner(cfg))
        trial = study.ask()
        params = {k: _suggest(trial, k, r) for k, r in space.items()}
        run_name = f"{name}-{sha256_json(params)[:12]}"
        _progress(name, trial.number, len(done), t, study, elapsed, params)
        started = time.monotonic()
        try:
            trial_cfg = with_settings(base, params, name=run_name, stages=STUDY_STAGES[name])
            if (runs / run_name).exists():  # a cut-off trial's folder: its epochs are reported again from the start
                shutil.rmtree(runs / run_name)
            ctx = run_pipeline(trial_cfg, artifacts=runs, cache_dir=artifacts / ".cache", withhold_test=True,
                               epoch_hooks={name: _pruning_hook(trial)})
            metrics = ctx.results[name].metrics
            value = metrics.get("selected_val_accuracy")
            if value is None:  # a stage that kept the last epoch's weights: its validation accuracy
                value = metrics["history"][-1]["val_acc"]
            trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
            study.tell(trial, float(value))
            log.info(f"[tune] {name} trial {trial.number}: validation accuracy {value:.4f}")
        except optuna.TrialPruned as e:
            trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
            study.tell(trial, state=TrialState.PRUNED)
            log.info(f"[tune] {name} trial {trial.number}: stopped early ({e})")
        except (CompressError, ValueError) as e:  # a diverging loss, settings a stage refuses: the next trial
            trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
            trial.set_user_attr("failed", str(e)[:300])
            study.tell(trial, state=TrialState.FAIL)
            log.warning(f"[tune] {name} trial {trial.number} failed: {e}")
        finally:
            shutil.rmtree(runs / run_name, ignore_errors=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise CompressError(f"tuning {name}: no trial finished ({len(study.trials)} tried); widen tune.space "
                            "or raise the budget (tune.trials, tune.minutes)")
    best = max(complete, key=lambda tr: (tr.value, -tr.number))  # the first of equals
    rows = [{"number": tr.number, "state": tr.state.name.lower(), "value": tr.value, "params": tr.params,
             "seconds": tr.user_attrs.get("seconds"), "last_epoch": tr.last_step}
            for tr in study.get_trials(deepcopy=False)]
    log.info(f"[tune] {name}: best validation accuracy {best.value:.4f} (trial {best.number} of {len(rows)}): "
             + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()))
    return {"study": name, "study_name": study_name, "storage": _redact(storage.url if hasattr(storage, "url") else ""),
            "best_params": dict(best.params), "best_value": best.value, "best_trial": best.number,
            "baseline": {k: _current(base, k) for k in space}, "trials": rows,
            "seconds": round(sum(r["seconds"] or 0.0 for r in rows), 1)}


def _current(cfg: PipelineConfig, key: str):
    section, field = key.split(".", 1)
    value = getattr(getattr(cfg, section), field)
    return list(value) if isinstance(value, tuple) else value


def _redact(url: str) -> str:
    """A storage URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


def _pruning_hook(trial):
    import optuna

    def hook(epoch: int, row: dict) -> None:
        trial.report(float(row["val_acc"]), step=epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"validation accuracy {row['val_acc']:.4f} at epoch {epoch}")

    return hook


def _progress(name: str, number: int, done: int, t, study, elapsed: float, params: dict) -> None:
    from optuna.trial import TrialState

    of = f" of {t.trials}" if t.trials is not None else ""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = f"best so far {max(tr.value for tr in complete):.4f}" if complete else "no result yet"
    left = f", {max(0.0, 60 * t.minutes - elapsed) / 60:.1f} min left" if t.minutes is not None else ""
    log.info(f"[tune] {name} trial {done + 1}{of} (#{number}): {best}{left}; "
             + ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()))
