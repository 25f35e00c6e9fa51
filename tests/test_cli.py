"""The command line as a user meets it: one line on stderr and exit code 2 for bad input (the catalogue
of bad inputs is tests/test_bad_inputs.py); an end-to-end smoke pipeline; skipping, caching and nothing
half-written."""

import json

import numpy as np
import onnx
import pytest
import torch

from compress.data import DataConfig, load_data
from compress.evaluate import ort_session
from compress.models import create_model

pytestmark = pytest.mark.e2e


def _one_line_error(result, needle):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert needle in lines[0], lines[0]


def test_unknown_model(cli):
    _one_line_error(cli("models", "nothing*"), "no tested model matches")


def test_models_lists_parameter_counts(cli):
    """The counts are of 10-class models: torchvision's published count of each ImageNet model with its
    1000-class head (features × 1000 weights + 1000 biases) exchanged for a 10-class one."""
    from torchvision.models import get_model_weights

    r = cli("models", "shufflenet*")
    assert r.returncode == 0
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:-1]}
    for width, features in (("x0_5", 1024), ("x1_0", 1024), ("x1_5", 1024), ("x2_0", 2048)):
        name = f"shufflenet_v2_{width}"
        imagenet = get_model_weights(name).IMAGENET1K_V1.meta["num_params"]
        assert rows[name][3] == f"{imagenet - (features * 1000 + 1000) + (features * 10 + 10):,}", rows[name]


def test_teacher_from_checkpoint_and_export_bench_commands(cli, tiny_recipe, tmp_path):
    torch.manual_seed(0)
    teacher = create_model("mobilenetv3_small_050", 10)
    ckpt = tmp_path / "t.pt"
    torch.save(teacher.state_dict(), ckpt)
    art = tmp_path / "art"
    r = cli("pipeline", tiny_recipe(stages=["teacher", "distill"]), "--set", f"teacher.checkpoint={ckpt}",
            "--artifacts", art)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((art / "tiny" / "teacher" / "metrics.json").read_text())
    assert metrics["source"].startswith("checkpoint")

    out = tmp_path / "student.onnx"
    r = cli("export", art / "tiny" / "distill" / "model.safetensors", "--out", out)
    assert r.returncode == 0, r.stderr
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["compress.model"] == "mobilenetv2_035" and props["compress.image_size"] == "16"
    r = cli("bench", out, "--runs", "5", "--threads", "1", "--dataset", "digits", "--json", "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    student = json.loads((art / "tiny" / "distill" / "metrics.json").read_text())
    assert result["runs"] == 5 and result["files"][0]["accuracy"] == student["test_accuracy"]  # PyTorch = ONNX
    assert result["cells"][0]["p50_ms"] > 0
    _one_line_error(cli("bench", tmp_path / "nope.onnx"), "not found")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nope")
    _one_line_error(cli("bench", bad), "not a readable ONNX file")
    _one_line_error(cli("export", tmp_path / "nope.safetensors", "--out", tmp_path / "x.onnx"), "not found")


def test_smoke_pipeline_end_to_end_then_skips(cli, tiny_recipe, tmp_path):
    art = tmp_path / "art"
    recipe = tiny_recipe()
    r = cli("pipeline", recipe, "--artifacts", art)
    assert r.returncode == 0, r.stderr
    run = art / "tiny"
    for stage in ("teacher", "distill", "export", "bench"):
        for f in ("metrics.json", "config.json", "stage.json"):
            assert (run / stage / f).is_file(), (stage, f)
    assert not (run / ".work").exists() or not any((run / ".work").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    student = next(row for row in summary["table"] if row["role"] == "student")
    for key in ("params", "macs", "onnx_size_bytes", "latency", "torch_accuracy", "onnx_accuracy",
                "distillation_factor", "kl_teacher_student", "correlation"):
        assert student[key] is not None, key
    assert student["onnx_accuracy"] == pytest.approx(student["torch_accuracy"], abs=1e-6)
    report = (run / "report.md").read_text()
    assert "distillation factor" in report and "mobilenetv2_035" in report
    # what a deployer reads from the file: the models, the data, the classes, the input and its normalization
    fp32 = run / "export" / "model_fp32.onnx"
    props = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
    assert (props["compress.teacher"], props["compress.student"], props["compress.dataset"]) == \
        ("mobilenetv3_small_050", "mobilenetv2_035", "digits")
    assert json.loads(props["compress.input_size"]) == [1, 3, 16, 16]
    assert json.loads(props["compress.class_names"]) == [str(d) for d in range(10)]
    teacher_params, student_params = (sum(p.numel() for p in create_model(m, 10).parameters())
                                      for m in ("mobilenetv3_small_050", "mobilenetv2_035"))
    assert float(props["compress.distillation_factor"]) == pytest.approx(teacher_params / student_params, abs=1e-4)
    # the test split's 0..1 pixels normalized with the file's mean and std give the logits of the run's test split
    raw = load_data(DataConfig(image_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))).test
    mean, std = (np.array(json.loads(props[k]), dtype=np.float32).reshape(1, 3, 1, 1)
                 for k in ("compress.mean", "compress.std"))
    session = ort_session(fp32, threads=1)
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: (raw.images.numpy() - mean) / std})[0]
    want = session.run(None, {name: load_data(DataConfig(image_size=16)).test.images.numpy()})[0]
    np.testing.assert_allclose(logits, want, rtol=1e-3, atol=1e-3)
    accuracy = float((logits.argmax(1) == raw.labels.numpy()).mean())
    assert float(props["compress.accuracy"]) == pytest.approx(accuracy, abs=1e-6)

    again = cli("pipeline", recipe, "--artifacts", art)
    assert again.returncode == 0
    assert again.stderr.count("unchanged, skipped") == 4, again.stderr

    # a changed distill setting reruns distill and what follows, and reuses the teacher
    changed = cli("pipeline", recipe, "--artifacts", art, "--set", "distill.alpha=0.5")
    assert "[teacher] unchanged, skipped" in changed.stderr
    assert "[distill] running" in changed.stderr and "[bench] running" in changed.stderr

    # another run with the same data and teacher settings reuses the cached teacher
    other = cli("pipeline", tiny_recipe(name="other", stages=["teacher"]), "--artifacts", art)
    assert other.returncode == 0 and "reusing cached" in other.stderr


def test_models_all_lists_timm_and_torchvision_names(cli):
    r = cli("models", "--all", "efficientnet_b*")
    assert r.returncode == 0, r.stderr
    names = [line.split()[0] for line in r.stdout.splitlines()[1:-1]]
    assert "efficientnet_b0" in names and "torchvision:efficientnet_b0" in names
    assert all("efficientnet_b" in n for n in names)
    tested = cli("models", "mobilenet*")
    assert "compress models --all" in tested.stdout.splitlines()[-1]
    _one_line_error(cli("models", "--all", "no_such_model*"), "no timm or torchvision model matches")


def test_probe_refuses_what_a_stage_cannot_handle_before_anything_is_written(cli, tiny_recipe, tmp_path):
    """ConvNeXt's layer scales and LayerNorms shrink with its channels, which a pruned checkpoint does
    not record; a ViT made for 224-pixel images does not run on 16-pixel ones."""
    art = tmp_path / "art"
    recipe = tiny_recipe(stages=["teacher", "distill", "prune", "export", "bench"], data={"image_size": 32})
    r = cli("pipeline", recipe, "--student", "convnext_atto", "--artifacts", art)
    _one_line_error(r, "student convnext_atto cannot be pruned (")
    assert "remove 'prune' from stages (--set 'stages=[teacher,distill,export,bench]')" in r.stderr
    _one_line_error(cli("pipeline", tiny_recipe(), "--teacher", "vit_tiny_patch16_224", "--artifacts", art),
                    "teacher vit_tiny_patch16_224 does not run on 16×16 images")
    assert not art.exists()


def test_pretrained_files_start_teacher_and_student(cli, tiny_recipe, tmp_path):
    """A resnet18 teacher from a 1000-class safetensors file and a mobilenetv2 student from a
    1000-class torch file, both for the 10 digits (epochs 0: the saved models are the started ones)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    teacher_file, student_file = tmp_path / "resnet18.safetensors", tmp_path / "student.pt"
    save_file(create_model("resnet18", 1000).state_dict(), str(teacher_file))
    torch.save(create_model("mobilenetv2_035", 1000).state_dict(), student_file)
    art = tmp_path / "art"
    recipe = tiny_recipe(stages=["teacher", "distill"], teacher={"model": "resnet18", "epochs": 0,
                                                                 "pretrained": str(teacher_file)},
                         distill={"pretrained": str(student_file), "epochs": 0})
    r = cli("pipeline", recipe, "--artifacts", art)
    assert r.returncode == 0, r.stderr
    run = art / "tiny"
    for stage, original, head in (("teacher", load_file(str(teacher_file)), "fc."),
                                  ("distill", torch.load(student_file, weights_only=True), "classifier.")):
        saved = load_file(str(run / stage / "model.safetensors"))
        assert saved[f"{head}weight"].shape[0] == 10
        body = [k for k in saved if not k.startswith(head) and "num_batches" not in k]
        assert body and all(torch.equal(saved[k], original[k]) for k in body), stage
    assert "pretrained weights" in json.loads((run / "teacher" / "metrics.json").read_text())["source"]
    assert json.loads((run / "distill" / "metrics.json").read_text())["start"] == f"pretrained weights {student_file}"


def test_a_diverging_run_ends_with_one_whole_line(cli, tiny_recipe, tmp_path):
    """The loss turning nan stops the run with one line that ends the line (the shell prompt is not
    glued to it) and no stage folder."""
    r = cli("pipeline", tiny_recipe(stages=["teacher"]), "--artifacts", tmp_path / "art", "--set", "teacher.lr=10")
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("compress: error: ")]
    assert len(errors) == 1 and "loss became nan at epoch 1; lower the learning rate" in errors[0], r.stderr
    assert r.stderr.endswith("lower the learning rate\n") and "Traceback" not in r.stderr
    assert not (tmp_path / "art" / "tiny" / "teacher").exists()
