import pytest
import torch

from compress.errors import CompressError
from compress.models import ALIASES, REGISTRY, create_model, load_checkpoint, load_weights, resolve_name, save_checkpoint


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_model_builds_trains_and_has_gradients(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]


def test_aliases_resolve():
    assert resolve_name("mobilenet") == "mobilenetv2_100"
    assert resolve_name("shufflenet") == "shufflenet_v2_x1_0"
    assert set(ALIASES.values()) <= set(REGISTRY)


def test_unknown_model_lists_valid_names():
    with pytest.raises(CompressError) as e:
        create_model("resnet1000", 10)
    msg = str(e.value)
    assert "unknown model 'resnet1000'" in msg and "resnet18" in msg and "shufflenet" in msg
    assert "\n" not in msg


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_050", 4).eval()
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, {"model": "mobilenetv3_small_050", "num_classes": 4})
    again, meta = load_checkpoint(path)
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(model(x), again(x))
    assert meta["num_classes"] == 4

    # a torch file is read with weights_only=True
    pt = tmp_path / "m.pt"
    torch.save(model.state_dict(), pt)
    from_pt = load_weights(create_model("mobilenetv3_small_050", 4), pt).eval()
    assert torch.equal(from_pt(x), model(x))

    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CompressError, match="cannot be read"):
        load_weights(create_model("mobilenetv3_small_050", 4), corrupt)
    with pytest.raises(CompressError, match="does not fit"):
        load_weights(create_model("mobilenetv3_small_050", 7), path)
    with pytest.raises(CompressError, match="not found"):
        load_weights(model, tmp_path / "absent.safetensors")
