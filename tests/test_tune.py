"""Tuning on the validation split: the test split is withheld from trials, a killed search resumes from
its stored trials and chooses what an uninterrupted one chooses, and the pipeline runs with the choice."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from compress.config import load_recipe
from compress.pipeline import run_pipeline
from tests.conftest import ROOT, run_cli

TUNE = {"stages": ["teacher"], "trials": 3, "startup_trials": 1}


def test_a_trial_never_reads_the_test_split(tiny_recipe, tmp_path):
    cfg = load_recipe(tiny_recipe("withheld", stages=["teacher"]))
    seen = []
    ctx = run_pipeline(cfg, artifacts=tmp_path, withhold_test=True,
                       epoch_hooks={"teacher": lambda epoch, row: seen.append((epoch, row["val_acc"]))})
    metrics = ctx.results["teacher"].metrics
    assert "test_accuracy" not in metrics and metrics["selected_val_accuracy"] == seen[-1][1]
    with pytest.raises(Exception, match="withheld"):
        ctx.data.test[0]
    # the teacher it cached has no test accuracy: a run that may read the test split measures it
    ctx = run_pipeline(cfg, artifacts=tmp_path / "later", cache_dir=tmp_path / ".cache")
    assert ctx.results["teacher"].metrics["cached"] and 0 < ctx.results["teacher"].metrics["test_accuracy"] <= 1


def _tune_cmd(recipe, artifacts):
    return [sys.executable, "-m", "compress", "tune", str(recipe), "--artifacts", str(artifacts)]


@pytest.mark.e2e
def test_killed_search_resumes_and_chooses_the_same_settings(tiny_recipe, tmp_path):
    recipe = tiny_recipe("search", stages=["teacher"], teacher={"epochs": 2}, tune=TUNE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = run_cli("tune", recipe, "--artifacts", tmp_path / "a", timeout=600)
    assert straight.returncode == 0, straight.stderr
    chosen = json.loads((tmp_path / "a" / "search" / "tune" / "tune.json").read_text())

    runs = tmp_path / "b" / "search" / "tune" / "runs"
    proc = subprocess.Popen(_tune_cmd(recipe, tmp_path / "b"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    seen: set[str] = set()
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill inside the second trial's training
        for folder in runs.glob("*") if runs.is_dir() else []:
            if list(folder.glob(".work/*/*/last.pt")) or list(folder.glob(".work/*/last.pt")):
                seen.add(folder.name)
        if len(seen) >= 2:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert len(seen) >= 2, "the search ended before the kill"
    resumed = run_cli("tune", recipe, "--artifacts", tmp_path / "b", timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    again = json.loads((tmp_path / "b" / "search" / "tune" / "tune.json").read_text())
    assert again["settings"] == chosen["settings"]
    trials = again["studies"][0]["trials"]
    assert [t["state"] for t in trials].count("fail") == 1  # the cut-off trial, run again with its settings
    cut = next(t for t in trials if t["state"] == "fail")
    assert any(t["params"] == cut["params"] and t["state"] != "fail" for t in trials)
    ok = lambda rows: [(t["params"], t["value"]) for t in rows if t["state"] != "fail"]  # noqa: E731
    assert ok(trials) == ok(chosen["studies"][0]["trials"])
    # a finished search is not run again
    t0 = time.time()
    assert run_cli("tune", recipe, "--artifacts", tmp_path / "b").returncode == 0
    assert time.time() - t0 < 60


@pytest.mark.e2e
def test_pipeline_runs_with_the_tuned_settings_and_reports_them(tiny_recipe, tmp_path):
    recipe = tiny_recipe("tuned", stages=["teacher"], tune={**TUNE, "trials": 2})
    r = run_cli("pipeline", recipe, "--tune", "--artifacts", tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "tuned" / "tune" / "tune.json").read_text())
    lr = record["settings"]["teacher.lr"]
    used = json.loads((tmp_path / "tuned" / "teacher" / "config.json").read_text())
    assert used["teacher"]["lr"] == lr  # the chosen setting is the one the stage ran with
    report = (tmp_path / "tuned" / "report.md").read_text()
    assert "## Tuning on the validation split" in report and f"{lr:.4g}" in report
    assert "optimization history" in (tmp_path / "tuned" / "report.html").read_text()
