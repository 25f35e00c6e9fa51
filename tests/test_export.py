import importlib.util
import json
import re

import numpy as np
import onnx
import pytest
from types import SimpleNamespace
import torch

from compress import edge_formats as E
from compress.bench import latency
from compress.data import DataConfig, load_data
from compress.errors import CheckFailed, CompressError
from compress.evaluate import ort_predict, ort_session
from compress.export import export_onnx, logit_excess, parity, read_metadata
from compress.models import create_model
from conftest import EDGE_MODELS, done_stages


@pytest.fixture(scope="module")
def data():
    return load_data(DataConfig(image_size=16))


@pytest.mark.parametrize("name", EDGE_MODELS)
def test_export_passes_checker_parity_and_has_dynamic_batch(name, data, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, data.num_classes).eval()
    path = export_onnx(model, tmp_path / "m.onnx", 16, opset=18, metadata={"compress.dataset": "digits", "compress.mean": [0.1, 0.2, 0.3]})
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version >= 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    assert read_metadata(path)["compress.mean"] == "[0.1, 0.2, 0.3]"
    report = parity(model, path, data.test, max_abs_diff=1e-4, min_agreement=1.0, rtol=1e-5)
    assert report["images"] == 540 and report["argmax_agreement"] == 1.0
    assert report["tolerance"] == {"atol": 1e-4, "rtol": 1e-5}
    sess = ort_session(path)
    out = sess.run(None, {"input": np.zeros((5, 3, 16, 16), np.float32)})[0]
    assert out.shape == (5, 10)


def test_parity_failure_is_reported(data, tmp_path):
    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_050", 10).eval()
    path = export_onnx(model, tmp_path / "m.onnx", 16)
    with torch.no_grad():
        model.classifier.bias.add_(1.0)  # the ONNX file no longer matches the model
    with pytest.raises(CheckFailed, match="parity failed"):
        parity(model, path, data.test, max_abs_diff=1e-4, min_agreement=1.0)


def test_logit_tolerance_grows_with_each_images_largest_logit():
    ref = np.array([[55.0, -3.0, 0.5], [0.2, -0.1, 0.05]], np.float32)
    got = ref.copy()
    got[0, 1] += 3e-4  # beside a logit of 55: within 1e-4 + 1e-5 * 55 = 6.5e-4
    assert logit_excess(got, ref, atol=1e-4, rtol=1e-5) == pytest.approx(3e-4 / 6.5e-4, rel=1e-3)
    assert logit_excess(got, ref, atol=1e-4, rtol=0.0) > 1.0  # the absolute limit alone refuses it
    got[1, 2] += 3e-4  # the second image's logits are small: its limit stays near 1e-4
    assert logit_excess(got, ref, atol=1e-4, rtol=1e-5) > 2.5


def test_latency_measures_the_file_at_its_own_size(data, tmp_path):
    model = create_model("mobilenetv3_small_050", 10).eval()
    path = export_onnx(model, tmp_path / "m.onnx", 16)
    lat = latency(path, threads=1, warmup=2, runs=20)
    assert (lat["runs"], lat["threads"], lat["image_size"], lat["threads_setting"]) == (20, 1, 16, "1 thread")
    assert lat["p50_ms"] > 0
    with pytest.raises(CompressError, match="takes 16x16 inputs, not 32x32"):
        latency(path, 32, threads=1, warmup=0, runs=1)


# -- edge formats: ORT format, OpenVINO IR, onnxruntime's mobile usability verdict -------------------

OPENVINO = importlib.util.find_spec("openvino") is not None


def _cnn(seed: int) -> torch.nn.Module:
    """A small CNN (two conv-BN-ReLU blocks, pooling, a linear head) with its own BatchNorm statistics."""
    torch.manual_seed(seed)

    def block(i, o, s):
        return [torch.nn.Conv2d(i, o, 3, s, 1, bias=False), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]

    model = torch.nn.Sequential(*block(3, 16, 1), *block(16, 32, 2), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(32, 10))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def onnx_pair(data, tmp_path_factory):
    """The small CNN's FP32 ONNX file (with metadata) and its int8 QDQ file (onnxruntime's PTQ)."""
    from compress.data import calibration_array
    from compress.qat import ptq_static

    folder = tmp_path_factory.mktemp("edge")
    fp32 = export_onnx(_cnn(0), folder / "model_fp32.onnx", 16, metadata={"compress.mean": [0.5]})
    int8 = folder / "model_int8.onnx"
    ptq_static(fp32, int8, calibration_array(data.train, 16, 256))
    return fp32, int8


def test_ort_format_files_are_bitwise_identical_to_their_onnx_files(onnx_pair, data, tmp_path):
    import onnxruntime as ort

    fp32, int8 = onnx_pair
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    made = E.to_ort([fp32, int8], out, work)
    assert made["files"] == {"model_fp32.onnx": "model_fp32.ort", "model_int8.onnx": "model_int8.ort"}
    # the converter's work files stay in the work folder, which it leaves empty
    assert sorted(p.name for p in out.iterdir()) == ["model_fp32.ort", "model_int8.ort", E.ORT_OPERATORS_CONFIG]
    assert not any(work.iterdir())
    ops = (out / E.ORT_OPERATORS_CONFIG).read_text()
    assert "# - model_int8.ort" in ops and "QLinearConv" in ops and str(tmp_path) not in ops
    for onnx_path in (fp32, int8):
        p = E.ort_parity(out / f"{onnx_path.stem}.ort", onnx_path, data.test,
                         ort_predict(ort_session(onnx_path), data.test)[0])
        assert p["passed"] and p["images"] == 540
        assert p["max_abs_logit_diff"] == 0.0 and p["argmax_agreement"] == 1.0
        assert p["session_config"] == {"session.enable_saved_runtime_optimizations": "1"}
        assert 0.0 <= p["max_abs_logit_diff_vs_default_session"] < 1e-3
    meta = ort.InferenceSession(str(out / "model_fp32.ort"), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert meta.custom_metadata_map["compress.mean"] == "[0.5]"  # the deployer metadata travels along
    # the gate is identity: another file's logits fail it, with the numbers in the message
    with pytest.raises(CheckFailed, match=r"model_int8\.ort: its logits are not identical to model_fp32\.onnx's: "
                                          r"max \|Δlogit\| [0-9.e+-]+, argmax agreement [0-9.]+%"):
        E.ort_parity(out / "model_int8.ort", fp32, data.test)
    # a file onnxruntime cannot read is one line that names it
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(CompressError, match=r"^onnxruntime cannot convert to ORT format \(broken\.onnx: "):
        E.to_ort([bad], out, work)
    assert not (out / "broken.ort").exists()


@pytest.mark.skipif(not OPENVINO, reason="openvino is not installed (pip install 'compress[openvino]')")
def test_openvino_ir_agrees_with_its_onnx_file(onnx_pair, data, tmp_path):
    fp32, int8 = onnx_pair
    out, work = tmp_path / "out", tmp_path / "work"
    for onnx_path, limit in ((fp32, 1.0), (int8, 0.9)):
        ir = E.to_openvino(onnx_path, out, work)
        xml, bin_ = out / ir["xml"], out / ir["bin"]
        assert (ir["xml"], ir["bin"]) == (f"{onnx_path.stem}.xml", f"{onnx_path.stem}.bin")
        assert ir["size_bytes"] == xml.stat().st_size + bin_.stat().st_size
        assert 'element_type="f16"' not in xml.read_text()  # weights kept in float32
        p = E.openvino_parity(xml, onnx_path, data.test, limit, accuracy_gate=onnx_path == int8)
        assert p["passed"] and p["images"] == 540 and p["argmax_agreement"] >= limit
        assert ("accuracy_check" in p) == (onnx_path == int8)
        assert p["config"] == {"INFERENCE_PRECISION_HINT": "f32"} and p["device"] == "CPU"
        assert p["max_abs_logit_diff"] < (1e-4 if onnx_path == fp32 else 0.5)
    assert sorted(p.name for p in out.iterdir()) == ["model_fp32.bin", "model_fp32.xml", "model_int8.bin", "model_int8.xml"]
    assert not any(work.iterdir())
    other = export_onnx(_cnn(1), tmp_path / "other.onnx", 16)
    failed = E.openvino_parity(out / "model_fp32.xml", other, data.test, 1.0)
    assert not failed["passed"] and failed["argmax_agreement"] < 1.0
    assert re.fullmatch(r"OpenVINO parity failed for model_fp32\.xml: argmax agreement with other\.onnx [0-9.]+% "
                        r"\(limit 100\.00%\), max \|Δlogit\| [0-9.e+-]+; logits reach [0-9.e+-]+", failed["reason"])


def test_openvino_absent_is_reported_not_raised(monkeypatch):
    from compress.report import export_tables

    monkeypatch.setattr(E.importlib.util, "find_spec", lambda name: None)
    status = E.openvino_status()
    assert status == {"available": False, "reason": "openvino is not installed (pip install 'compress[openvino]')"}
    notes = export_tables({"edge": {"formats": ["openvino"], "openvino": status}})[0][3]
    assert notes == ["OpenVINO IR: not written (openvino is not installed (pip install 'compress[openvino]'))."]


def test_mobile_usability_verdict_per_execution_provider(onnx_pair):
    fp32, _ = onnx_pair
    u = E.mobile_usability(fp32)
    eps = u["execution_providers"]
    assert set(eps) == {"NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram"}
    for ep in eps.values():
        assert ep["as_is"]["verdict"] in ("YES", "MAYBE", "NO") and ep["as_is"]["nodes"] > 0
    # the batch axis is dynamic: NNAPI takes nothing as is and the whole graph once the shape is fixed
    nnapi = eps["NNAPI"]
    assert nnapi["as_is"]["verdict"] == "NO" and nnapi["as_is"]["supported_nodes"] == 0
    assert nnapi["fixed_input_shape"]["verdict"] == "YES"
    assert nnapi["fixed_input_shape"]["supported_nodes"] == nnapi["fixed_input_shape"]["nodes"]
    assert u["try_nnapi_or_coreml"] is True
    assert "make_dynamic_shape_fixed --input_name input --input_shape 1,3,16,16 model_fp32.onnx" in u["recommendation"]


def test_edge_formats_are_validated_before_anything_runs(cli, tiny_recipe, tmp_path):
    from compress.config import validate_recipe

    assert validate_recipe({"name": "x"}).export.edge_formats == ["ort", "openvino"]
    assert validate_recipe({"name": "x", "export": {"edge_formats": "ort"}}).export.edge_formats == ["ort"]
    with pytest.raises(CompressError, match="export.edge_formats: each edge format may appear once"):
        validate_recipe({"name": "x", "export": {"edge_formats": ["ort", "ort"]}})
    r = cli("pipeline", tiny_recipe(), "--set", "export.edge_formats=[ort,tflite]", "--artifacts", tmp_path / "a")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "export.edge_formats: unknown edge format 'tflite'; valid: ort, openvino" in r.stderr
    assert not (tmp_path / "a").exists()


def _export_context(tmp_path):
    """A run whose teacher and distill stages are done (two 16-pixel MobileNetV2 checkpoints): what the
    export stage reads."""
    from compress.config import validate_recipe
    from compress.context import RunContext, StageResult
    from compress.models import save_checkpoint
    from compress.stages.common import MODEL_FILE, model_meta

    cfg = validate_recipe({"name": "t", "stages": ["teacher", "distill", "export"],
                           "data": {"dataset": "digits", "image_size": 16, "test_fraction": 0.05},
                           "teacher": {"model": "mobilenetv2_035"}, "distill": {"student": "mobilenetv2_035"}})
    ctx = RunContext(cfg=cfg, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache")
    for seed, stage in enumerate(("teacher", "distill")):
        torch.manual_seed(seed)
        save_checkpoint(create_model("mobilenetv2_035", 10).eval(), ctx.stage_dir(stage) / MODEL_FILE,
                        model_meta(ctx, "mobilenetv2_035", stage))
        ctx.results[stage] = StageResult(stage, ctx.stage_dir(stage), f"{stage}-fingerprint", {
            "model": "mobilenetv2_035", "teacher": "mobilenetv2_035", "distillation_factor": 1.0,
            "method": "kd", "alpha": 0.9, "temperature": 4.0})
    return ctx


@pytest.mark.skipif(not OPENVINO, reason="openvino is not installed (pip install 'compress[openvino]'): the "
                                       "stage's edge formats are ort and openvino")
def test_export_stage_ships_checked_edge_files_and_logs_a_failed_gate(tmp_path):
    from compress import stages
    from compress.logs import run_log
    from compress.pipeline import run_stage
    from compress.context import StageResult
    from compress.report import export_tables, markdown, summary

    ctx = _export_context(tmp_path)
    log_file = ctx.run_dir / "run.log"
    with run_log(log_file):
        metrics = run_stage(ctx, stages.get("export")).metrics
    out = ctx.stage_dir("export")
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "teacher_fp32.onnx", "model_fp32.onnx", "model_fp32.ort", "required_operators.with_runtime_opt.config",
        "model_fp32.bin", "model_fp32.xml", "metrics.json", "config.json", "stage.json"])
    student, teacher = metrics["student"], metrics["teacher"]
    assert "ort" not in teacher and "openvino" not in teacher  # the teacher ships ONNX only
    assert student["ort"]["parity"]["passed"] and student["ort"]["parity"]["max_abs_logit_diff"] == 0.0
    assert student["parity"]["min_argmax_agreement"] == 1.0
    assert student["mobile_usability"]["execution_providers"]["NNAPI"]["fixed_input_shape"]["verdict"] == "YES"
    edge = metrics["edge"]
    assert edge["formats"] == ["ort", "openvino"] and edge["ort"]["target_platform"] == "arm"
    assert edge["openvino"]["available"] is True
    assert (student["openvino"]["xml"], student["openvino"]["bin"]) == ("model_fp32.xml", "model_fp32.bin")
    assert student["openvino"]["parity"]["argmax_agreement"] == 1.0
    assert student["openvino"]["parity"]["min_argmax_agreement"] == 1.0
    # the report states each file's reference, gate and numbers
    (_, head, rows, notes), (_, mobile_head, mobile_rows, _) = export_tables(metrics)
    by_file = {r[1]: dict(zip(head, r)) for r in rows}
    onnx_row = by_file["model_fp32.onnx"]
    assert onnx_row["compared with"] == "PyTorch"
    # the relative part is the one the gate used: the recipe's, or 8 × PyTorch's float32 noise when larger
    noise = student["parity"]["float32_noise"]
    rtol = max(1e-5, 8.0 * noise["torch_vs_float64_max_rel"])
    assert student["parity"]["tolerance"]["rtol"] == pytest.approx(rtol) and noise["recipe_rtol"] == 1e-5
    assert onnx_row["gate"] == (f"abs Δlogit ≤ 0.0001 + {rtol:g} × the image's largest abs logit; "
                                "agreement ≥ 100.00%")
    assert onnx_row["max abs Δlogit"] == f"{student['parity']['max_abs_logit_diff']:.2e}"
    assert by_file["model_fp32.ort"]["gate"] == "bitwise identical logits"
    assert by_file["model_fp32.ort"]["max abs Δlogit"] == "0.00e+00" and by_file["model_fp32.ort"]["result"] == "passed"
    assert by_file["model_fp32.xml + model_fp32.bin"]["gate"] == "agreement ≥ 100.00% (CPU, INFERENCE_PRECISION_HINT f32)"
    assert by_file["model_fp32.xml + model_fp32.bin"]["result"] == "passed"
    assert "session.enable_saved_runtime_optimizations = 1" in notes[0]
    assert mobile_head[2:5] == ["NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram"]
    assert mobile_rows[0][2].startswith("NO as is (0 partitions, 0/"), mobile_rows[0][2]
    assert "; YES with a fixed input shape (1 partition, " in mobile_rows[0][2]
    assert "[export] model_fp32.ort: logits identical to model_fp32.onnx" in log_file.read_text()
    ctx.results["export"] = StageResult("export", out, "export-fingerprint", metrics)
    md = markdown(ctx, summary(ctx)["table"])
    assert "## Parity of the shipped files (whole test split)" in md and "## Mobile usability" in md
    assert "| student FP32 | `model_fp32.ort` | `model_fp32.onnx` (onnxruntime, extended optimizations) | " \
           "bitwise identical logits | 0.00e+00 | 100.00% | passed | — |" in md

    # a gate that fails stops the stage, leaves its reason and numbers in run.log and keeps the file aside
    ctx.cfg.export.max_abs_logit_diff, ctx.cfg.export.logit_rtol = 1e-12, 0.0
    ctx.cfg.export.float64_factor = None
    with run_log(log_file), pytest.raises(CheckFailed) as failed:
        run_stage(ctx, stages.get("export"))
    assert "ONNX parity failed for teacher_fp32.onnx: max |Δlogit| " in str(failed.value)
    rejected = ctx.run_dir / "rejected"
    assert (rejected / "teacher_fp32.onnx").stat().st_size > 0
    record = json.loads((rejected / "teacher_fp32.onnx.json").read_text())
    assert record["reason"] == str(failed.value) and record["details"]["max_abs_logit_diff"] > 1e-12
    assert "(limit 1e-12 + 0 × the image's largest |logit|), argmax agreement " in str(failed.value)
    assert f"ERROR compress.stages.export: [export] failed: {failed.value}\n" in log_file.read_text()
    assert not list(ctx.run_dir.glob(".tmp-*"))
    assert json.loads((out / "metrics.json").read_text())["student"]["ort"]["file"] == "model_fp32.ort"  # the last good one


def test_report_states_the_int8_gates_and_an_absent_edge_format():
    """What the export section says of the int8 files: the QAT file against the fake-quant model with
    its agreement limit and kernels, the PTQ file by its kernels alone, the INT8 OpenVINO IR with its own
    limit."""
    from compress.report import export_tables

    kernels = {"quantized_convolutions": 52, "float_convolutions": 0}
    ov = {"xml": "model_int8.xml", "bin": "model_int8.bin", "size_bytes": 1, "compress_to_fp16": False,
          "parity": {"reference": "model_int8.onnx in onnxruntime", "device": "CPU",
                     "config": {"INFERENCE_PRECISION_HINT": "f32"}, "images": 540, "max_abs_logit_diff": 0.031,
                     "argmax_agreement": 0.9963, "min_argmax_agreement": 0.995, "passed": True}}
    metrics = {
        "student_int8": {"file": "model_int8.onnx", "kernels": kernels, "openvino": ov,
                         "parity": {"max_abs_logit_diff": 0.12, "argmax_agreement": 0.998, "tolerance": None,
                                    "min_argmax_agreement": 0.995, "passed": True}},
        "student_int8_ptq": {"file": "model_int8_ptq.onnx", "kernels": kernels},
        "edge": {"formats": ["openvino"], "openvino": {"available": True, "version": "x"}},
        "stage_seconds": 1.0,
    }
    (_, head, rows, notes), = export_tables(metrics)
    qat, ir, ptq = (dict(zip(head, r)) for r in rows)
    assert (qat["compared with"], qat["gate"]) == ("PyTorch fake-quant model",
                                                   "agreement ≥ 99.50%; every convolution an int8 kernel")
    assert (qat["max abs Δlogit"], qat["argmax agreement"], qat["convolutions onnxruntime runs in int8 / float"]) == \
        ("1.20e-01", "99.80%", "52 / 0")
    assert ir["file"] == "model_int8.xml + model_int8.bin" and ir["compared with"] == "model_int8.onnx (onnxruntime)"
    assert (ir["gate"], ir["argmax agreement"]) == ("agreement ≥ 99.50% (CPU, INFERENCE_PRECISION_HINT f32)", "99.63%")
    assert (ptq["compared with"], ptq["gate"], ptq["max abs Δlogit"]) == ("— (no PyTorch twin)",
                                                                          "every convolution an int8 kernel", "—")
    assert notes == []
    assert export_tables({"edge": {"formats": []}})[0][3] == ["Edge formats: none (export.edge_formats is empty)."]


def test_float_noise_alone_never_refuses_a_correct_export(data, tmp_path):
    from torch.utils.data import Subset

    data = SimpleNamespace(test=Subset(data.test, range(128)))
    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_050", 10).eval()
    path = export_onnx(model, tmp_path / "m.onnx", 16)
    # a fixed tolerance far below float32's resolution refuses the correct file...
    with pytest.raises(CheckFailed, match="parity failed"):
        parity(model, path, data.test, max_abs_diff=1e-9, min_agreement=1.0, rtol=0.0)
    # ...the tolerance measured against the model's float64 run accepts it and says what it used
    report = parity(model, path, data.test, max_abs_diff=1e-9, min_agreement=1.0, rtol=0.0, float64_factor=8.0)
    noise = report["float32_noise"]
    assert noise["torch_vs_float64_max_rel"] > 0
    assert report["tolerance"]["rtol"] == pytest.approx(8.0 * noise["torch_vs_float64_max_rel"])
    # and a file that computes something else is still refused
    with torch.no_grad():
        model.classifier.bias.add_(1.0)
    with pytest.raises(CheckFailed, match="parity failed") as failed:
        parity(model, path, data.test, max_abs_diff=1e-4, min_agreement=1.0, rtol=1e-5, float64_factor=8.0)
    assert failed.value.details["max_abs_logit_diff"] == pytest.approx(1.0, rel=1e-3)


def test_int8_ir_gate_refuses_only_an_accuracy_loss_beyond_chance():
    """Two int8 runtimes may flip close calls either way; an IR is refused when it loses more images
    than chance explains (McNemar, 2 sigma), not for disagreeing."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 800)
    ref = np.eye(4)[labels] * 3 + rng.normal(0, 1, (800, 4))

    def flips(idx, to):  # logits whose images `idx` are classified as `to`
        got = ref.copy()
        got[idx] = np.eye(4)[to] * 5
        return got

    right = np.flatnonzero(ref.argmax(1) == labels)
    wrong = np.flatnonzero(ref.argmax(1) != labels)
    # 18 disagreements, 10 lost and 8 won: a wash
    even = flips(np.r_[right[:10], wrong[:8]], np.r_[(labels[right[:10]] + 1) % 4, labels[wrong[:8]]])
    ok = E.accuracy_no_worse(even, ref, labels)
    assert ok["no_worse"] and (ok["right_only_in_reference"], ok["right_only_here"]) == (10, 8)
    # 18 disagreements, all lost: 18 > 2 sqrt(18)
    worse = flips(right[:18], (labels[right[:18]] + 1) % 4)
    bad = E.accuracy_no_worse(worse, ref, labels)
    assert not bad["no_worse"] and bad["right_only_in_reference"] == 18 and bad["max_net_images_lost"] == 8.49
    assert bad["accuracy"] == pytest.approx(ok["reference_accuracy"] - 18 / 800)


@pytest.mark.skipif(not OPENVINO, reason="openvino is not installed (pip install 'compress[openvino]')")
def test_an_int8_ir_that_fails_its_gate_is_kept_aside_and_the_stage_goes_on(tmp_path, monkeypatch):
    """The INT8 OpenVINO IR fails its gate (the test makes the gate refuse it; an untrained model's IR
    would pass): it is not shipped, ``rejected/`` keeps both its files with the gate's record, and the
    export stage succeeds with the FP32 IR shipped."""
    from compress import stages
    from compress.logs import run_log
    from compress.pipeline import run_stage

    ctx = done_stages(tmp_path, {"stages": ["teacher", "distill", "quantize", "export"],
                                 "quantize": {"epochs": 0, "calibration_images": 32},
                                 "export": {"edge_formats": ["openvino"], "ptq_baseline": False,
                                            "float64_factor": None}},
                      {"teacher": "mobilenetv3_small_050", "distill": "mobilenetv3_small_050"})
    ctx.results["quantize"] = run_stage(ctx, stages.get("quantize"))
    real = E.openvino_parity
    gated = []

    def refusing_int8(xml, onnx_path, ds, limit, logits, *, accuracy_gate=False):
        p = real(xml, onnx_path, ds, limit, logits, accuracy_gate=accuracy_gate)
        gated.append((xml.name, accuracy_gate))
        if accuracy_gate:  # the INT8 IR
            p = {**p, "passed": False, "reason": f"OpenVINO parity failed for {xml.name}: refused by the test"}
        return p

    monkeypatch.setattr(E, "openvino_parity", refusing_int8)
    log_file = ctx.run_dir / "run.log"
    with run_log(log_file):
        metrics = run_stage(ctx, stages.get("export")).metrics
    assert sorted(gated) == [("model_fp32.xml", False), ("model_int8.xml", True)]
    out, rejected = ctx.stage_dir("export"), ctx.run_dir / "rejected"
    shipped = sorted(p.name for p in out.iterdir())
    assert "model_fp32.xml" in shipped and "model_fp32.bin" in shipped and "model_int8.onnx" in shipped
    assert not any(name.startswith("model_int8.") and name != "model_int8.onnx" for name in shipped), shipped
    assert metrics["student"]["openvino"]["shipped"] is True
    ir = metrics["student_int8"]["openvino"]
    assert ir["shipped"] is False and ir["parity"]["passed"] is False
    kept = sorted(p.name for p in rejected.iterdir()) if rejected.is_dir() else []
    assert kept == ["model_int8.bin", "model_int8.xml", "model_int8.xml.json"]
    record = json.loads((rejected / "model_int8.xml.json").read_text())
    assert record["file"] == "model_int8.xml" and record["reason"] == ir["parity"]["reason"]
    assert record["details"]["argmax_agreement"] == ir["parity"]["argmax_agreement"]
    sizes = {p.suffix: p.stat().st_size for p in rejected.glob("model_int8.*") if p.suffix in (".xml", ".bin")}
    assert sizes[".xml"] + sizes[".bin"] == ir["size_bytes"]  # the files measured, moved as they were
    # what was kept aside is the IR that was measured: it still loads and runs
    import openvino as ov

    compiled = ov.Core().compile_model(str(rejected / "model_int8.xml"), "CPU")
    logits = compiled.create_infer_request().infer({0: np.zeros((1, 3, 16, 16), np.float32)})[compiled.outputs[0]]
    assert logits.shape == (1, 10)
    logged = log_file.read_text()
    assert "WARNING compress.stages.export: [export] OpenVINO parity failed for model_int8.xml: refused by the test\n" \
        in logged
    assert f"model_int8.xml failed its check and is not shipped; kept in {rejected / 'model_int8.xml'}" in logged
