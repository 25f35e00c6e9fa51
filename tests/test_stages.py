"""Every stage of the registry on one small run through the command line: each keeps the stage
contract (its folder holds metrics.json, config.json and stage.json; a rerun skips it), prune really
shrinks the student and quantize ships an int8 file onnxruntime runs with int8 kernels."""

import json

import numpy as np
import onnx
import pytest

from compress.evaluate import ort_session
from compress.graph import ORDER
from conftest import run_cli

pytestmark = pytest.mark.e2e

# the earlier stages whose outputs each stage reads: the fingerprints recorded as its upstream
READS = {"teacher": set(), "assistant": {"teacher"}, "distill": {"teacher", "assistant"},
         "prune": {"teacher", "distill"}, "quantize": {"teacher", "distill", "prune"},
         "export": {"teacher", "distill", "prune", "quantize"}, "bench": {"export"}}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Every stage (the ta method brings the assistant), run once and then again."""
    import yaml

    tmp = tmp_path_factory.mktemp("full")
    recipe = tmp / "full.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "full", "seed": 0, "stages": [s for s in ORDER if s != "assistant"],
        "data": {"dataset": "digits", "image_size": 16, "batch_size": 64},
        "teacher": {"model": "mobilenetv3_small_050", "epochs": 1, "lr": 0.01},
        "distill": {"student": "mobilenetv2_035", "epochs": 1, "lr": 0.01, "method": "ta",
                    "params": {"assistant": "mobilenetv2_050"}},
        "prune": {"iterative_steps": 2, "epochs": 0, "final_epochs": 1, "macs_target": 0.5},
        "quantize": {"epochs": 1},
        "bench": {"runs": 5, "warmup": 1, "image_sizes": [16], "threads": [1]}}))
    first = run_cli("pipeline", recipe, "--artifacts", tmp / "art")
    assert first.returncode == 0, first.stderr
    again = run_cli("pipeline", recipe, "--artifacts", tmp / "art")
    assert again.returncode == 0, again.stderr
    return {"run": tmp / "art" / "full", "first": first, "again": again, "tmp": tmp}


@pytest.mark.parametrize("name", ORDER)
def test_stage_contract(full_run, name):
    folder = full_run["run"] / name
    for f in ("metrics.json", "config.json", "stage.json"):
        assert (folder / f).is_file(), f
    record = json.loads((folder / "stage.json").read_text())
    upstream = {u: json.loads((full_run["run"] / u / "stage.json").read_text())["fingerprint"] for u in READS[name]}
    assert record["stage"] == name and record["upstream"] == upstream
    assert f"[{name}] running" in full_run["first"].stderr
    assert f"[{name}] unchanged, skipped" in full_run["again"].stderr
    assert f"[{name}] running" not in full_run["again"].stderr
    assert f"[{name}] running" in (full_run["run"] / "run.log").read_text()


def test_run_leaves_no_temporary_folders(full_run):
    run = full_run["run"]
    assert not list(run.glob(".tmp-*"))
    assert not (run / ".work").exists() or not any((run / ".work").iterdir())
    assert (run / "report.md").is_file() and (run / "summary.json").is_file()


def test_prune_stage_shrinks_the_exported_student(full_run):
    run, tmp = full_run["run"], full_run["tmp"]
    metrics = json.loads((run / "prune" / "metrics.json").read_text())
    assert metrics["macs_reduction"] >= 0.3 and len(metrics["steps"]) == 2
    assert metrics["params"] < metrics["unpruned_params"]
    pruned = (run / "export" / "model_pruned_fp32.onnx").stat().st_size
    assert pruned < 0.8 * (run / "export" / "model_fp32.onnx").stat().st_size
    assert "## Pruning" in (run / "report.md").read_text()
    # the pruned checkpoint exports on its own: its architecture travels with it, and the file computes
    # what the pipeline's pruned file computes
    out = tmp / "pruned.onnx"
    assert run_cli("export", run / "prune" / "model.safetensors", "--out", out).returncode == 0
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16), dtype=np.float32)
    again, shipped = (ort_session(f, threads=1) for f in (out, run / "export" / "model_pruned_fp32.onnx"))
    want = shipped.run(None, {shipped.get_inputs()[0].name: x})[0]
    assert want.shape == (8, 10) and np.abs(want).max() > 0.1
    np.testing.assert_allclose(again.run(None, {again.get_inputs()[0].name: x})[0], want, rtol=1e-4, atol=1e-5)


def test_quantize_writes_an_int8_file_onnxruntime_runs_in_int8(full_run):
    run, tmp = full_run["run"], full_run["tmp"]
    export = json.loads((run / "export" / "metrics.json").read_text())
    quantize = json.loads((run / "quantize" / "metrics.json").read_text())
    assert quantize["graph"]["float_convolutions"] == 0  # MobileNetV2's stem ends in a ReLU6: int8 is faster
    for role, float_convs in (("student_int8", 0), ("student_int8_ptq", 0)):
        assert export[role]["kernels"]["float_convolutions"] == float_convs
        assert export[role]["kernels"]["quantized_convolutions"] > 0
        assert export[role]["kernels"]["float_ops_between_int8"] == {}
    fp32 = (run / "export" / "model_pruned_fp32.onnx").stat().st_size
    assert (run / "export" / "model_int8.onnx").stat().st_size < 0.4 * fp32
    props = {p.key: p.value for p in onnx.load(str(run / "export" / "model_int8.onnx")).metadata_props}
    assert json.loads(props["compress.quantization"])["weights"].startswith("int8")
    assert json.loads(props["compress.quantization"])["first_convolution"] == "int8"
    assert props["compress.precision"] == "int8" and props["compress.pruned"] == "true"
    assert quantize["graph"]["batchnorms_folded"] > 0 and quantize["loss"] == "kd"
    assert quantize["from_stage"] == "prune"

    # the QAT checkpoint (pruned architecture) exports on its own to the same int8 graph
    out = tmp / "again_int8.onnx"
    r = run_cli("export", run / "quantize" / "model.safetensors", "--out", out)
    assert r.returncode == 0, r.stderr
    again = run_cli("bench", out, "--runs", "3", "--threads", "1", "--dataset", "digits", "--json", "--out", tmp / "b")
    assert json.loads(again.stdout)["files"][0]["accuracy"] == pytest.approx(export["student_int8"]["onnx_accuracy"], abs=1e-9)


def test_bench_measures_each_file_at_every_size_on_a_copy_of_that_size(full_run, tmp_path, monkeypatch):
    """``bench.image_sizes`` with a size other than the training size (16; unset means 16 and 224):
    every shipped file, the int8 files included, is measured at both; at 24 on a copy rebuilt at 24 (a
    file's spatial size is fixed), and its MACs are counted at 24."""
    from pathlib import Path

    from compress.bench import input_spec
    from compress.config import load_recipe
    from compress.context import RunContext, StageResult
    from compress.fsio import read_json
    from compress.stages import bench as stage

    cfg = load_recipe(full_run["tmp"] / "full.yaml", ["bench.image_sizes=[16,24]", "bench.runs=2", "bench.warmup=0"])
    ctx = RunContext(cfg=cfg, run_dir=full_run["run"], cache_dir=tmp_path / "cache")
    for name in cfg.stages[:-1]:
        ctx.results[name] = StageResult(name, ctx.stage_dir(name), "", read_json(ctx.stage_dir(name) / "metrics.json"))
    measured, real = [], stage.latency

    def recording(path, image_size=None, **kw):
        dims = input_spec(path)[1]
        measured.append((Path(path).name, image_size))
        assert dims[1:] == [3, image_size, image_size], (Path(path).name, image_size, dims)
        return real(path, image_size, **kw)

    monkeypatch.setattr(stage, "latency", recording)
    rows = stage.run(ctx, tmp_path / "out", tmp_path / "work")["models"]
    shipped = {role: e["file"] for role, e in read_json(full_run["run"] / "export" / "metrics.json").items()
               if isinstance(e, dict) and "file" in e}
    assert set(rows) == set(shipped) and len(shipped) == 5
    assert sorted(measured) == sorted([(f, 16) for f in shipped.values()]
                                      + [(f"{role}_24.onnx", 24) for role in shipped])
    for role, row in rows.items():
        assert [lat["image_size"] for lat in row["latency"]] == [16, 24], role
        assert all(lat["p50_ms"] > 0 for lat in row["latency"]), role
        assert set(row["macs"]) == {"16", "24"} and row["macs"]["24"] > row["macs"]["16"], role


def test_report_rows_follow_the_artifact_table(full_run):
    summary = json.loads((full_run["run"] / "summary.json").read_text())
    rows = {r["role"]: r for r in summary["table"]}
    assert list(rows) == ["teacher", "student", "student_pruned", "student_int8", "student_int8_ptq"]
    assert rows["student_int8"]["label"] == "student INT8 (QAT)" and rows["student_int8"]["precision"] == "int8"
    # a quantized file keeps the pruned student's architecture
    assert rows["student_int8"]["params"] == rows["student_pruned"]["params"] < rows["student"]["params"]


def test_a_pretrained_file_enters_the_fingerprint_by_its_content(tmp_path):
    """Another file at the same path must not reuse a stage or a cached teacher; the same file at
    another path reuses the cached teacher."""
    import shutil

    import torch

    from compress.config import validate_recipe
    from compress.context import RunContext
    from compress.stages import distill, teacher

    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    torch.save({"w": torch.zeros(2)}, a)
    torch.save({"w": torch.ones(2)}, b)
    shutil.copy(a, c)

    def ctx(path):
        cfg = validate_recipe({"name": "x", "teacher": {"pretrained": str(path)}, "distill": {"pretrained": str(path)}})
        return RunContext(cfg=cfg, run_dir=tmp_path, cache_dir=tmp_path)

    before = (teacher.identity(ctx(a)), distill.identity(ctx(a)), teacher.cache_key(ctx(a), "resnet18"))
    shutil.copy(b, a)  # same path, other weights
    after = (teacher.identity(ctx(a)), distill.identity(ctx(a)), teacher.cache_key(ctx(a), "resnet18"))
    assert all(x != y for x, y in zip(before, after))
    assert teacher.cache_key(ctx(c), "resnet18") == before[2]


def test_preflight_refuses_weights_that_do_not_fit_before_anything_is_written(tmp_path):
    import torch

    from compress.config import validate_recipe
    from compress.errors import CompressError
    from compress.models import create_model
    from compress.pipeline import run_pipeline

    weights = tmp_path / "resnet18.pt"
    torch.save(create_model("resnet18", 1000).state_dict(), weights)
    cfg = validate_recipe({"name": "x", "stages": ["teacher", "distill"], "data": {"image_size": 16},
                           "teacher": {"model": "mobilenetv3_small_050"},
                           "distill": {"student": "mobilenetv2_035", "pretrained": str(weights)}})
    with pytest.raises(CompressError, match="do not fit mobilenetv2_035"):
        run_pipeline(cfg, artifacts=tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_a_student_qat_cannot_rewrite_is_refused_before_anything_is_written(tmp_path):
    """RepVGG's identity branches are BatchNorms on their own, which QAT cannot fold into a
    convolution: the quantize stage's probe refuses the student in one line that names the stage to
    leave out, before any stage runs."""
    from compress.config import validate_recipe
    from compress.errors import CompressError
    from compress.pipeline import run_pipeline

    cfg = validate_recipe({"name": "x", "stages": ["teacher", "distill", "quantize", "export", "bench"],
                           "data": {"image_size": 16}, "teacher": {"model": "mobilenetv3_small_050", "epochs": 0},
                           "distill": {"student": "repvgg_a0", "epochs": 0}, "quantize": {"epochs": 0}})
    with pytest.raises(CompressError) as refused:
        run_pipeline(cfg, artifacts=tmp_path / "art")
    line = str(refused.value)
    assert "\n" not in line
    assert line.startswith("student repvgg_a0 cannot be quantized (QAT: BatchNorm not after a convolution "
                           "cannot be folded: stages.0.1.identity"), line
    assert line.endswith("; remove 'quantize' from stages (--set 'stages=[teacher,distill,export,bench]')"), line
    assert not (tmp_path / "art").exists()


def test_the_ptq_baseline_is_exports_setting(full_run, tmp_path):
    """Turning the PTQ baseline off re-runs export and bench (which read it) and no stage that trains."""
    import shutil

    art = tmp_path / "art"
    shutil.copytree(full_run["run"].parent, art, symlinks=True)
    r = run_cli("pipeline", full_run["tmp"] / "full.yaml", "--artifacts", art, "--set", "export.ptq_baseline=false",
                "--set", "export.edge_formats=[]")  # export reruns either way; no edge files keeps it short
    assert r.returncode == 0, r.stderr
    for name in ("teacher", "assistant", "distill", "prune", "quantize"):
        assert f"[{name}] unchanged, skipped" in r.stderr, name
    for name in ("export", "bench"):
        assert f"[{name}] running" in r.stderr, name
    assert (full_run["run"] / "export" / "model_int8_ptq.onnx").is_file()
    assert not (art / "full" / "export" / "model_int8_ptq.onnx").exists()
    assert (art / "full" / "export" / "model_int8.onnx").is_file()
