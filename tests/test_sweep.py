"""compress sweep: students × series, the CSV/JSON and the three plots, latency measured like the bench
stage (a fresh process pinned to the sweep's thread count of cores), resume without retraining."""

import csv
import json
import struct

import pytest

from compress.bench import default_cores
from compress.sweep import pareto
from conftest import CHROMIUM, NO_CHROMIUM, render, run_cli, write_tiny_recipe


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_pareto_front_by_hand():
    rows = [{"fp32_latency_ms": 1.0, "accuracy": 0.90}, {"fp32_latency_ms": 2.0, "accuracy": 0.95},
            {"fp32_latency_ms": 2.5, "accuracy": 0.93}, {"fp32_latency_ms": 3.0, "accuracy": 0.99},
            {"fp32_latency_ms": 0.5, "accuracy": 0.80}]
    assert pareto(rows) == [4, 0, 1, 3]  # row 2 is slower and less accurate than row 1


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two students × {kd, scratch}, swept once and then again."""
    tmp = tmp_path_factory.mktemp("sweep")
    recipe = write_tiny_recipe(tmp, "sw", sweep={"students": ["mobilenetv2_035", "shufflenet_v2_x0_5"],
                                                "series": ["kd", "scratch"], "latency_size": 32, "latency_runs": 3})
    first = run_cli("sweep", recipe, "--artifacts", tmp / "art")
    assert first.returncode == 0, first.stderr
    again = run_cli("sweep", recipe, "--artifacts", tmp / "art")
    assert again.returncode == 0, again.stderr
    return {"out": tmp / "art" / "sw", "again": again}


@pytest.mark.e2e
def test_sweep_writes_csv_json_and_plots(sweep):
    out = sweep["out"]
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(x["student"], x["series"]) for x in rows] == [
        ("mobilenetv2_035", "kd"), ("mobilenetv2_035", "scratch"), ("shufflenet_v2_x0_5", "kd"), ("shufflenet_v2_x0_5", "scratch")]
    result = json.loads((out / "sweep.json").read_text())
    for row in result["rows"]:  # each row is its own run's distill stage
        run = json.loads((out / "runs" / f"{row['student']}-{row['series']}" / "distill" / "metrics.json").read_text())
        assert row["accuracy"] == run["test_accuracy"] and row["distillation_factor"] == run["distillation_factor"] > 1
        assert row["fp32_latency_ms"] > 0 and row["int8_latency_ms"] > 0
        cached = json.loads((out / "latency" / f"{row['student']}.json").read_text())
        assert cached["fp32_p50_ms"] == row["fp32_latency_ms"] and cached["cores"] == default_cores(1)
    # the front, by a sweep from the fastest row: a row is on it when it is more accurate than every faster
    # row, or ties the last row put on it in both latency and accuracy (the two series of one student share
    # its latency)
    points = [(row["fp32_latency_ms"], row["accuracy"]) for row in result["rows"]]
    front, best = [], None
    for i in sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1])):
        if best is None or points[i][1] > best[1] or points[i] == best:
            front.append(i)
            best = points[i]
    assert result["pareto"] == front, points
    for name in ("accuracy_vs_distillation_factor.png", "accuracy_vs_relative_error.png", "accuracy_vs_latency.png"):
        w, h = _png_size(out / name)
        assert w > 300 and h > 200
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 3


@pytest.mark.e2e
@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_sweep_report_renders_in_chromium(sweep):
    shown = render(sweep["out"] / "report.html")
    assert shown["images"] == 3 and shown["decoded"] == 3 and shown["rows"] == 4


@pytest.mark.e2e
def test_sweep_resumes_without_retraining(sweep):
    again = sweep["again"]
    assert again.stderr.count("[distill] unchanged, skipped") == 4 and "[distill] running" not in again.stderr
    assert "p50 FP32" not in again.stderr  # latency is cached per student too


@pytest.mark.e2e
def test_sweep_bad_input(cli, tiny_recipe, tmp_path):
    art = tmp_path / "art"
    r = cli("sweep", tiny_recipe("a", sweep={"students": ["resnet999"]}), "--artifacts", art)
    assert r.returncode == 2 and "sweep.students: unknown model 'resnet999'" in r.stderr and r.stderr.count("\n") == 1
    r = cli("sweep", tiny_recipe("b", sweep={"series": ["ta"]}), "--artifacts", art)
    assert r.returncode == 2 and "needs extra models" in r.stderr
    r = cli("sweep", tiny_recipe("c"), "--artifacts", art)
    assert r.returncode == 2 and "has no sweep section" in r.stderr
    assert not art.exists()
