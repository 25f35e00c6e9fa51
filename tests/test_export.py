import numpy as np
import onnx
import pytest
import torch

from compress.bench import latency
from compress.data import DataConfig, load_data
from compress.errors import CheckFailed, CompressError
from compress.evaluate import ort_session
from compress.export import export_onnx, logit_excess, parity, read_metadata
from compress.models import create_model
from conftest import EDGE_MODELS


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
