"""``compress compare``: one student, one teacher, one budget, every method of a list; each method is
its own pipeline run (teacher → [assistant →] distill) under ``artifacts/<name>/<method>/`` so reruns skip
and killed runs resume, and the teacher is trained once (the shared teacher cache)."""

from __future__ import annotations

import logging
from pathlib import Path

from compress.config import PipelineConfig, validate_recipe
from compress.data import load_data
from compress.distill.methods import METHODS, summary
from compress.errors import CompressError, ConfigError
from compress.fsio import write_json, write_text
from compress.models import resolve_name
from compress.pipeline import run_lock, run_pipeline
from compress.report import write_reports

log = logging.getLogger(__name__)


def method_config(cfg: PipelineConfig, method: str) -> PipelineConfig:
    assert cfg.compare is not None
    raw = cfg.model_dump(mode="json")
    raw.pop("compare")
    raw["name"] = method
    raw["stages"] = ["teacher", "distill"]
    raw["distill"]["method"] = method
    raw["distill"]["params"] = cfg.compare.params.get(method, {})
    return validate_recipe(raw, f"compare.{method}")


def run_compare(cfg: PipelineConfig, artifacts: Path = Path("artifacts"), force: bool = False) -> dict:
    if cfg.compare is None:
        raise ConfigError(f"recipe {cfg.name!r} has no compare section (compare.methods: [scratch, kd, ...])")
    configs = {m: method_config(cfg, m) for m in cfg.compare.methods}  # every recipe checked before training
    with run_lock(artifacts / cfg.name, cfg.name):  # one compare of this name at a time
        return _run_compare(cfg, configs, artifacts, force)


def _run_compare(cfg: PipelineConfig, configs: dict[str, PipelineConfig], artifacts: Path, force: bool) -> dict:
    assert cfg.compare is not None
    out_dir = artifacts / cfg.name
    rows, failed, ctx = [], [], None
    for i, method in enumerate(cfg.compare.methods):
        log.info(f"[compare] {i + 1}/{len(cfg.compare.methods)}: {method}")
        try:
            ctx = run_pipeline(configs[method], artifacts=out_dir, force=force, cache_dir=artifacts / ".cache",
                               finish=write_reports)
        except CompressError as e:  # one method failing (e.g. a diverging loss) does not stop the others
            log.info(f"[compare] {method} failed: {e}")
            failed.append(method)
            rows.append({"method": method, "summary": summary(METHODS[method]), "failed": str(e)})
            continue
        m = ctx.results["distill"].metrics
        extra = {}
        if "assistant" in ctx.results:
            a = ctx.results["assistant"].metrics
            extra = {"assistant": a["model"], "assistant_accuracy": a["test_accuracy"],
                     "assistant_train_seconds": a.get("train_seconds")}
        if "extra_teachers" in ctx.results["teacher"].metrics:
            extra["teachers"] = [ctx.results["teacher"].metrics["model"], *ctx.results["teacher"].metrics["extra_teachers"]]
        if "peers" in m:
            extra["peers"] = m["peers"]
        rows.append({
            "method": method, "summary": summary(METHODS[method]), "model": m["model"], "teacher": m["teacher"],
            "accuracy": m["accuracy"], "teacher_accuracy": m["teacher_accuracy"],
            "relative_error": m["relative_error"], "distillation_factor": m["distillation_factor"],
            "kl_teacher_student": m["kl_teacher_student"], "correlation": m["correlation"],
            "seconds_per_epoch": m["seconds_per_epoch"], "train_seconds": m["train_seconds"],
            "final_loss": m["history"][-1]["loss"] if m["history"] else None, "params": m["params"],
            "method_params": m.get("method_params", {}), **extra,
        })
    dataset = ctx.data.describe() if ctx is not None else load_data(cfg.data).describe()
    result = {"name": cfg.name, "student": resolve_name(cfg.distill.student), "teacher": resolve_name(cfg.teacher.model),
              "dataset": dataset, "epochs": cfg.distill.epochs, "rows": rows}
    write_json(out_dir / "compare.json", result)
    write_text(out_dir / "report.md", markdown(cfg, result))
    log.info(f"[compare] table: {out_dir / 'report.md'}")
    if failed:
        raise CompressError(f"compare: {', '.join(failed)} failed (see {out_dir / 'report.md'})")
    return result


def markdown(cfg: PipelineConfig, result: dict) -> str:
    d = result["dataset"]
    rows = result["rows"]
    ok = [r for r in rows if "failed" not in r]
    t_acc = f" (test accuracy {ok[0]['teacher_accuracy']:.4f})" if ok else ""
    lines = [f"# Distillation methods compared: `{cfg.name}`", "",
             f"Student `{result['student']}` from teacher `{result['teacher']}`{t_acc}, {d['dataset']} at {d['image_size']}×{d['image_size']} "
             f"(train/val/test {d['sizes']['train']}/{d['sizes']['val']}/{d['sizes']['test']}), "
             f"{result['epochs']} epochs each, lr {cfg.distill.lr}, seed {cfg.seed}. Accuracy, relative error "
             "(eq. 6: student error / teacher error), KL(teacher ‖ student) (eq. 8) and correlation (eq. 9) "
             "are on the test split; the first row is the from-scratch baseline when it was run.", "",
             "| method | accuracy | Δ vs first row | relative error | KL | correlation | s / epoch | notes |",
             "|---|---|---|---|---|---|---|---|"]
    base = ok[0]["accuracy"] if ok else 0.0
    for r in rows:
        if "failed" in r:
            lines.append(f"| `{r['method']}` | failed | | | | | | {r['failed']} |")
            continue
        notes = []
        if "assistant" in r:
            notes.append(f"assistant `{r['assistant']}` {r['assistant_accuracy']:.4f}, "
                         f"{r['assistant_train_seconds']:.0f} s")
        if "teachers" in r:
            notes.append("teachers " + ", ".join(f"`{t}`" for t in r["teachers"]))
        if "peers" in r:
            notes.append("peers " + ", ".join(f"`{p['model']}` {p['test_accuracy']:.4f}" for p in r["peers"]))
        lines.append(f"| `{r['method']}` | {r['accuracy']:.4f} | {r['accuracy'] - base:+.4f} | "
                     f"{r['relative_error']:.3f} | {r['kl_teacher_student']:.4f} | {r['correlation']:.4f} | "
                     f"{r['seconds_per_epoch']:.2f} | {'; '.join(notes)} |")
    lines += ["", "Methods:", ""]
    lines += [f"- `{r['method']}`: {r['summary']}" for r in rows]
    return "\n".join(lines) + "\n"
