"""Every student of the registry passes the INT8 export gate after a short training (its own file, so
that pytest-xdist runs it beside the rest of the QAT tests)."""

import onnx
import pytest
import torch

from compress.config import ExportConfig
from compress.data import DataConfig, load_data, without_augmentation
from compress.evaluate import loader
from compress.export import parity
from compress.models import create_model
from compress.qat import (FLOAT_CONV_OPS, QUANT_CONV_OPS, calibrate, export_qdq, float_ops_between_int8, optimized_ops,
                          prepare_qat, qat_schedule, qat_summary)
from conftest import EDGE_MODELS


@pytest.fixture(scope="module")
def digits32():
    return load_data(DataConfig(image_size=32))


def _convs(model):
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def _briefly_trained(name, ds, steps=12):
    """A model after a short budget of training on real images (a network at initialization has logits
    near zero and near-ties everywhere: not what the export gate ever sees). Two threads always, so
    that the model does not depend on how many the test process has (make test's workers have one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return _train_steps(name, ds, steps)
    finally:
        torch.set_num_threads(threads)


def _train_steps(name, ds, steps):
    torch.manual_seed(0)
    model = create_model(name, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    model.train()
    batches = list(loader(ds, 64, shuffle=True, generator=torch.Generator().manual_seed(0)))
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    # BatchNorm statistics averaged over 384 images (a few steps leave them half at their init)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for x, _ in batches[:6]:
            model(x)
    return model.eval()


@pytest.mark.parametrize("name", EDGE_MODELS)
def test_every_student_passes_the_int8_export_gate(name, digits32, tmp_path):
    """Every student of the registry, briefly trained and calibrated on real images: onnxruntime runs
    its int8 file with int8 kernels only after the float stem (no float convolution but the stem's, no
    float operation between int8 kernels), and the file passes the export stage's gate against the
    fake-quant model: argmax agreement >= 99.5% on the test split and max |Δlogit| within 5% of
    the logits' range."""
    model = _briefly_trained(name, digits32.train)
    gm = prepare_qat(model, torch.zeros(1, 3, 32, 32))
    calibrate(gm, [x for x, _ in loader(without_augmentation(digits32.train), 128)][:2])
    qat_schedule(gm, 10**9, 0, 0)
    gm.eval()
    path = tmp_path / "int8.onnx"
    info = export_qdq(gm, path, 32)
    stem = qat_summary(gm)["float_convolutions"]
    # the stem stays float where its activation is hard-swish (MobileNetV3), int8 where it is a ReLU
    assert stem == int(name.startswith("mobilenetv3")) and info["weights_stored_int8"] >= _convs(model) - stem
    ops = optimized_ops(path, shape_arithmetic=False)
    assert sum(ops[o] for o in FLOAT_CONV_OPS) == stem, dict(ops)
    assert sum(ops[o] for o in QUANT_CONV_OPS) == _convs(model) - stem, dict(ops)
    assert not float_ops_between_int8(path), dict(ops)
    # weights are stored as integers: no float weight tensor of a convolution remains
    proto = onnx.load(str(path))
    assert len([t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4]) == stem
    p = parity(gm, path, digits32.test, max_abs_diff=float("inf"), min_agreement=ExportConfig().int8_min_argmax_agreement)
    spread = p["logit_range"][1] - p["logit_range"][0]
    assert p["max_abs_logit_diff"] <= 0.05 * spread, (p["max_abs_logit_diff"], spread)
