"""QAT: the fake-quant model, its int8 ONNX export, and what onnxruntime makes of it."""

import numpy as np
import pytest
import torch

from compress.export import export_onnx
from compress.models import create_model
from compress.qat import (ActFakeQuant, QConvBn2d, calibrate, enable_fake_quant, export_qdq, kernel_report, prepare_qat,
                          ptq_static, qat_schedule, set_observers)
from conftest import done_stages


def _convs(model):
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def _prepared(name, size=32, seed=0, batches=None):
    """A model in its fake-quant inference state, calibrated on ``batches`` (default: random images)."""
    torch.manual_seed(seed)
    model = create_model(name, 10).eval()
    gm = prepare_qat(model, torch.zeros(1, 3, size, size))
    gen = torch.Generator().manual_seed(seed)
    calibrate(gm, batches or [torch.randn(16, 3, size, size, generator=gen) for _ in range(2)])
    enable_fake_quant(gm, True)
    set_observers(gm, False)
    return model, gm.eval()


def test_with_fake_quant_off_the_model_equals_the_float_model():
    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_050", 10).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so the folding is really exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    gm = prepare_qat(model, torch.zeros(1, 3, 32, 32))
    enable_fake_quant(gm, False)
    set_observers(gm, False)
    gm.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5, rtol=1e-5)
    enable_fake_quant(gm, True)
    with torch.no_grad():
        assert not torch.allclose(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_batchnorm_is_folded_and_switches_follow_the_schedule():
    _, gm = _prepared("mobilenetv2_035")
    convs = [m for m in gm.modules() if isinstance(m, QConvBn2d)]
    assert convs and all(c.bn is not None for c in convs)
    # every BatchNorm left in the model is one folded into a convolution: none runs on its own
    folded = {id(c.bn) for c in convs}
    assert all(id(m) in folded for m in gm.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    assert "batch_norm" not in gm.code.replace("F.batch_norm", "")  # and the graph calls none
    qat_schedule(gm, 0, freeze_observers_after=2, freeze_bn_after=3)
    assert all(m.observe for m in gm.modules() if isinstance(m, ActFakeQuant))
    assert not any(c.freeze_bn for c in convs)
    qat_schedule(gm, 3, freeze_observers_after=2, freeze_bn_after=3)
    assert not any(m.observe for m in gm.modules() if isinstance(m, ActFakeQuant))
    assert all(c.freeze_bn for c in convs)


def test_frozen_qat_training_step_keeps_running_statistics():
    _, gm = _prepared("mobilenetv2_035")
    qat_schedule(gm, 10, freeze_observers_after=1, freeze_bn_after=1)
    gm.train()
    before = {k: v.clone() for k, v in gm.state_dict().items() if "running" in k or "min_val" in k}
    out = gm(torch.randn(8, 3, 32, 32))
    out.sum().backward()
    after = gm.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_int8_file_is_small_and_ptq_baseline_fuses(tmp_path):
    model, gm = _prepared("mobilenetv2_100")
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", 32)
    qat = tmp_path / "qat.onnx"
    export_qdq(gm, qat, 32)
    assert qat.stat().st_size <= 0.30 * fp32.stat().st_size
    ptq = tmp_path / "ptq.onnx"
    ptq_static(fp32, ptq, np.random.default_rng(0).standard_normal((32, 3, 32, 32)).astype(np.float32))
    report = kernel_report(ptq)
    assert report["float_convolutions"] == 0 and report["quantized_convolutions"] == _convs(model)


def _contrib_op(op: str, inputs: list[tuple[str, int, list]], **attrs):
    """An onnxruntime session of one com.microsoft int8 operator, run without graph optimizations."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node(op, [n for n, _, _ in inputs], ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_int8_arithmetic_matches_onnxruntime_kernels():
    """The PyTorch emulation of QLinearAdd, QLinearMul (every pair of uint8 values, and a scalar operand)
    and QLinearGlobalAveragePool equals onnxruntime's kernels on this machine for random scales and zero
    points: the fake-quant model and the int8 file compute the same integers."""
    from onnx import TensorProto

    from compress.qat.modules import qlinear_add, qlinear_global_avg_pool, qlinear_mul

    u8, f32 = TensorProto.UINT8, TensorProto.FLOAT
    rng = np.random.default_rng(0)
    grid_a, grid_b = (g.ravel().astype(np.uint8) for g in np.meshgrid(np.arange(256), np.arange(256)))
    for op, emulate in (("QLinearAdd", qlinear_add), ("QLinearMul", qlinear_mul)):
        for scalar in (False, True):
            sess = _contrib_op(op, [("a", u8, [None]), ("sa", f32, []), ("za", u8, []), ("b", u8, [1] if scalar else [None]),
                                    ("sb", f32, []), ("zb", u8, []), ("sc", f32, []), ("zc", u8, [])])
            for _ in range(20):
                sa, sb, sc = (np.float32(rng.uniform(0.005, 0.3)) for _ in range(3))
                za, zb, zc = (np.uint8(rng.integers(0, 256)) for _ in range(3))
                a, b = (np.arange(256, dtype=np.uint8), np.array([rng.integers(0, 256)], np.uint8)) if scalar else (grid_a, grid_b)
                got = sess.run(None, {k: np.asarray(v) for k, v in dict(a=a, sa=sa, za=za, b=b, sb=sb, zb=zb, sc=sc, zc=zc).items()})[0]
                want = emulate(torch.from_numpy(a.astype(np.float32)), float(sa), int(za), torch.from_numpy(b.astype(np.float32)),
                               float(sb), int(zb), float(sc), int(zc))
                assert np.array_equal(want.numpy().astype(np.uint8), got), (op, scalar)
    sess = _contrib_op("QLinearAdd", [("a", u8, [None]), ("sa", f32, []), ("za", u8, []), ("b", u8, [1]), ("sb", f32, []),
                                      ("zb", u8, []), ("sc", f32, []), ("zc", u8, [])])
    for _ in range(50):  # hard-sigmoid's x + 3 on [0, 6] at 6/255: x = 0 lands halfway between two steps
        sa, za = np.float32(rng.uniform(0.005, 0.3)), np.uint8(rng.integers(0, 256))
        a = np.arange(256, dtype=np.uint8)
        got = sess.run(None, {k: np.asarray(v) for k, v in dict(a=a, sa=sa, za=za, b=np.array([255], np.uint8), sb=np.float32(3 / 255),
                                                                zb=np.uint8(0), sc=np.float32(6 / 255), zc=np.uint8(0)).items()})[0]
        want = qlinear_add(torch.from_numpy(a.astype(np.float32)), float(sa), int(za), torch.tensor([255.0]), 3 / 255, 0, 6 / 255, 0)
        assert np.array_equal(want.numpy().astype(np.uint8), got)
    sess = _contrib_op("QLinearGlobalAveragePool", [("x", u8, [None, None, None, None]), ("sx", f32, []), ("zx", u8, []),
                                                    ("sy", f32, []), ("zy", u8, [])], channels_last=0)
    for hw in (1, 2, 7, 14):
        x = rng.integers(0, 256, size=(4, 24, hw, hw)).astype(np.uint8)
        sx, sy = np.float32(rng.uniform(0.01, 0.2)), np.float32(rng.uniform(0.01, 0.2))
        zx, zy = np.uint8(rng.integers(0, 256)), np.uint8(rng.integers(0, 256))
        got = sess.run(None, {k: np.asarray(v) for k, v in dict(x=x, sx=sx, zx=zx, sy=sy, zy=zy).items()})[0]
        want = qlinear_global_avg_pool(torch.from_numpy(x.astype(np.float32)), float(sx), int(zx), float(sy), int(zy))
        assert np.array_equal(want.numpy().astype(np.uint8), got), hw


def _pool_between_quantizations(path, scale_before: float, scale_after: float):
    """QuantizeLinear → DequantizeLinear → MaxPool → QuantizeLinear → DequantizeLinear, as a QDQ export
    writes a max pooling between int8 tensors."""
    import onnx
    from onnx import TensorProto, helper

    inits = [helper.make_tensor("s0", TensorProto.FLOAT, [], [scale_before]),
             helper.make_tensor("s1", TensorProto.FLOAT, [], [scale_after]),
             helper.make_tensor("z", TensorProto.UINT8, [], [0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s0", "z"], ["q0"]),
             helper.make_node("DequantizeLinear", ["q0", "s0", "z"], ["d0"]),
             helper.make_node("MaxPool", ["d0"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["p", "s1", "z"], ["q1"]),
             helper.make_node("DequantizeLinear", ["q1", "s1", "z"], ["y"])]
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_max_pooling_runs_on_uint8_only_on_one_grid(tmp_path):
    """onnxruntime pools uint8 data when the quantizations before and after a max pooling are the same,
    and in float between them otherwise: the gate counts the second as a float operation; prepare_qat
    gives a max pooling's output its input's quantizer, so the export writes the first."""
    from compress.qat import float_ops_between_int8

    assert not float_ops_between_int8(_pool_between_quantizations(tmp_path / "same.onnx", 0.0128, 0.0128))
    assert float_ops_between_int8(_pool_between_quantizations(tmp_path / "other.onnx", 0.0128, 0.0127))["MaxPool"] == 1
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.MaxPool2d(3, 2, 1), torch.nn.Conv2d(8, 8, 3), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    gm = prepare_qat(model, torch.zeros(1, 3, 16, 16))
    pool = next(n for n in gm.graph.nodes if isinstance(gm.get_submodule(n.target) if n.op == "call_module" else None,
                                                          torch.nn.MaxPool2d))
    before, after = (gm.get_submodule(n.target) for n in (pool.args[0], next(iter(pool.users))))
    assert isinstance(after, ActFakeQuant) and after._tied == [before]
    calibrate(gm, [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))])
    qat_schedule(gm, 10**9, 0, 0)
    export_qdq(gm.eval(), tmp_path / "int8.onnx", 16)
    assert not float_ops_between_int8(tmp_path / "int8.onnx")


@pytest.mark.parametrize("float_stem", [True, False])
def test_the_float_stem_setting_reaches_the_checkpoint_and_its_reload(float_stem, tmp_path):
    """MobileNetV3's stem ends in a hard-swish, which an int8 convolution cannot fold: with
    ``quantize.float_stem`` the stage keeps that convolution float, without it quantizes it, and the
    checkpoint reloads in the form it was saved in."""
    from compress import stages
    from compress.fsio import read_json
    from compress.pipeline import run_stage
    from compress.qat import load_qat_checkpoint, qat_summary

    ctx = done_stages(tmp_path, {"stages": ["teacher", "distill", "quantize"],
                                 "quantize": {"epochs": 0, "calibration_images": 32, "float_stem": float_stem}},
                      {"teacher": "mobilenetv3_small_050", "distill": "mobilenetv3_small_050"})
    metrics = run_stage(ctx, stages.get("quantize")).metrics
    path = ctx.stage_dir("quantize") / "model.safetensors"
    assert metrics["graph"]["float_convolutions"] == int(float_stem)
    assert read_json(path.with_suffix(".json"))["float_stem"] is float_stem
    gm, meta = load_qat_checkpoint(path)
    assert meta["float_stem"] is float_stem and qat_summary(gm)["float_convolutions"] == int(float_stem)
    image = next(n for n in gm.graph.nodes if n.op == "placeholder")
    (reader,) = image.users  # a float stem reads the image itself; an int8 one reads it through a quantizer
    stem = gm.get_submodule(reader.target)
    assert isinstance(stem, QConvBn2d) is float_stem
    if float_stem:
        assert stem.keep_float
    assert metrics["graph"] == qat_summary(gm)


def _weight_on_a_rounding_edge(levels: float) -> tuple[float, float]:
    """(largest weight, a weight w) of one output channel such that float32 w / scale and w · (1/scale)
    round to different integers: the case where two ways of computing the int8 weight disagree."""
    import numpy as np

    top = np.float32(1.0)
    scale = torch.tensor([top]) / levels  # weight_scale's arithmetic
    for k in range(1, int(levels) - 1):
        centre = np.float32((k + 0.5) * float(scale))
        for step in range(-40, 41):
            w = np.float32(centre + step * np.spacing(centre))
            t = torch.tensor([[w]])
            by_division = torch.round(t / scale.reshape(-1, 1))
            by_fake_quant = torch.round(torch.fake_quantize_per_channel_affine(
                t, scale, torch.zeros(1, dtype=torch.int32), 0, -128, 127) / scale.reshape(-1, 1))
            if by_division.item() != by_fake_quant.item():
                return float(top), float(w)
    raise AssertionError("no weight on a rounding edge found")


def test_the_twin_computes_with_the_integers_the_int8_file_holds(tmp_path):
    """A weight whose quotient by its scale lies a hair from k + ½: the fake-quant model's convolution
    uses the int8 value the file stores, so its logits are onnxruntime's (the last layer is float)."""
    import numpy as np
    import onnxruntime as ort

    from compress.qat import calibrate, export_qdq, host_weight_bits, prepare_qat, qat_schedule

    bits = host_weight_bits()
    top, edge = _weight_on_a_rounding_edge(127.0 if bits == 8 else 63.0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.relu = torch.nn.ReLU()
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))

    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        model.conv.weight.uniform_(-0.5, 0.5)
        model.conv.weight[:, 0, 0, 0] = top
        model.conv.weight[:, 1, 1, 1] = edge  # every channel: the same edge case, in the centre tap
    gm = prepare_qat(model, torch.zeros(1, 3, 8, 8), float_stem=False, weight_bits=bits)
    x = torch.rand(64, 3, 8, 8)
    calibrate(gm, x.split(16))
    qat_schedule(gm, 10**9, 0, 0)
    gm.eval()
    path = tmp_path / "tiny_int8.onnx"
    export_qdq(gm, path, 8)
    with torch.no_grad():
        ref = gm(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
