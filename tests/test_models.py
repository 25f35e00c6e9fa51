import socket

import pytest
import torch

from compress.errors import CompressError
from compress.models import (ALIASES, REGISTRY, all_model_names, create_model, load_checkpoint, load_weights,
                             model_spec, pretrained_data_config, resolve_name, save_checkpoint)


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


def test_unknown_model_is_one_line_with_close_names():
    with pytest.raises(CompressError) as e:
        create_model("resnet1000", 10)
    msg = str(e.value)
    assert "unknown model 'resnet1000'" in msg and "resnet101" in msg and "compress models --all 'resnet*'" in msg
    assert "\n" not in msg and len(msg) < 300
    for bad in ("torchvision:nope", "resnet18.no_such_tag", "timm:shufflenet_v2_x1_0"):
        with pytest.raises(CompressError, match="unknown model"):
            resolve_name(bad)


def test_any_timm_or_torchvision_classifier_resolves_builds_and_round_trips(tmp_path):
    """Names outside the tested set: timm's (with an optional pretrained tag) and torchvision's; a name
    both know is timm's unless written torchvision:NAME. The canonical name rebuilds the checkpoint."""
    assert resolve_name("resnet18") == "resnet18" and model_spec("resnet18").lr_scale == 1.0
    assert resolve_name("timm:resnet18") == "resnet18"
    assert resolve_name("torchvision:resnet18") == "torchvision:resnet18"
    assert resolve_name("mnasnet0_5") == "torchvision:mnasnet0_5"  # torchvision only
    assert resolve_name("torchvision:shufflenet_v2_x0_5") == "shufflenet_v2_x0_5"  # a tested torchvision model
    assert resolve_name("regnetx_002.pycls_in1k") == "regnetx_002.pycls_in1k"
    assert model_spec("vgg11_bn").lr_scale == 0.2 and model_spec("regnetx_002").role == "any"
    assert type(create_model("torchvision:resnet18", 3)).__module__.startswith("torchvision.")
    assert type(create_model("resnet18", 3)).__module__.startswith("timm.")
    x = torch.randn(2, 3, 32, 32)
    for name in ("regnetx_002", "mnasnet0_5"):
        torch.manual_seed(0)
        model = create_model(name, 5).eval()
        assert model(x).shape == (2, 5)
        path = tmp_path / f"{name.replace(':', '_')}.safetensors"
        save_checkpoint(model, path, {"model": resolve_name(name), "num_classes": 5})
        again, meta = load_checkpoint(path)
        assert torch.equal(again(x), model(x)) and meta["model"] == resolve_name(name)


def test_all_model_names_lists_without_building():
    names = dict(all_model_names("efficientnet_b*"))
    assert names["efficientnet_b0"] == "timm" and names["torchvision:efficientnet_b0"] == "torchvision"
    assert all(n.startswith(("efficientnet_b", "torchvision:efficientnet_b")) for n in names)
    everything = all_model_names()
    assert len(everything) > 1000 and ("shufflenet_v2_x1_0", "torchvision") in everything


def _head_and_body(model, head):
    state = model.state_dict()
    return {k: v for k, v in state.items() if k.startswith(head)}, \
           {k: v for k, v in state.items() if not k.startswith(head) and "num_batches" not in k}


@pytest.mark.parametrize("name,head,suffix", [("resnet18", "fc.", ".safetensors"),
                                              ("mobilenetv2_035", "classifier.", ".pt"),
                                              ("torchvision:mnasnet0_5", "classifier.", ".pt")])
def test_pretrained_file_keeps_the_body_and_makes_a_new_head(tmp_path, name, head, suffix):
    """Weights saved from a 1000-class model start a 10-class one: every weight but the classifier's
    comes from the file."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = create_model(name, 1000)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    model = create_model(name, 10, pretrained=path)
    got_head, got_body = _head_and_body(model, head)
    _, want_body = _head_and_body(source, head)
    assert got_body.keys() == want_body.keys()
    assert all(torch.equal(got_body[k], want_body[k]) for k in want_body)
    assert [v.shape[0] for k, v in got_head.items() if k.endswith("weight")] == [10]
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    # the same number of classes: the head comes from the file too
    same = create_model(name, 1000, pretrained=path)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in same.state_dict().items())


def test_pretrained_file_refusals_are_one_line(tmp_path):
    import os

    class Payload:
        def __reduce__(self):
            return os.system, ("echo should-never-run",)

    evil = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload()}, evil)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not weights")
    other = tmp_path / "resnet18.pt"
    torch.save(create_model("resnet18", 1000).state_dict(), other)
    cases = [(evil, "resnet18", "carries code or objects (posix.system), refused for safety"),
             (corrupt, "resnet18", "cannot be read"),
             (tmp_path / "absent.pt", "resnet18", "not found"), (other, "resnet34", "do not fit resnet34"),
             (other, "mobilenetv2_035", "do not fit"), (other, "torchvision:resnet34", "do not fit")]
    for path, name, needle in cases:
        with pytest.raises(CompressError) as e:
            create_model(name, 10, pretrained=path)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_published_weights_offline_is_one_line(tmp_path, monkeypatch):
    """Without a network and with empty weight caches, published weights (timm's from the Hugging Face
    hub, torchvision's from download.pytorch.org) are refused in one line that says what to do."""
    from huggingface_hub import constants

    def unreachable(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def refused(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setattr(socket.socket, "connect", refused)
    monkeypatch.setattr(socket.socket, "connect_ex", refused)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch-hub"))
    offline = constants.HF_HUB_OFFLINE
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)  # set back after the test whatever happens
    for name in ("resnet18", "torchvision:mnasnet0_5"):
        with pytest.raises(CompressError) as e:
            create_model(name, 10, pretrained=True)
        msg = str(e.value)
        assert msg.startswith(f"could not fetch pretrained weights for {name} (") and "\n" not in msg, msg
        assert "they need the network: connect, or give pretrained: PATH" in msg, msg
    assert constants.HF_HUB_OFFLINE == offline  # the hub's offline switch is set back after the attempt


def test_pretrained_data_config_reads_the_published_preprocessing():
    import timm
    from timm.data import resolve_model_data_config

    assert pretrained_data_config("mobilenet", False) is None
    vit = pretrained_data_config("vit_tiny_patch16_224", True)
    assert vit == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "input_size": 224,
                   "interpolation": "bicubic", "crop_pct": 0.9}
    for name in ("inception_v3", "resnet18.a1_in1k", "efficientnet_b0"):
        want = resolve_model_data_config(timm.create_model(name, pretrained=False))
        got = pretrained_data_config(name, "weights.safetensors")
        assert got["input_size"] == want["input_size"][-1] and got["crop_pct"] == want["crop_pct"]
        assert got["mean"] == tuple(want["mean"]) and got["interpolation"] == want["interpolation"]
    assert pretrained_data_config("resnet18.a1_in1k", True)["crop_pct"] == 0.95
    tv = pretrained_data_config("torchvision:efficientnet_b3", True)
    assert tv["input_size"] == 300 and tv["interpolation"] == "bicubic"
    assert tv["crop_pct"] == pytest.approx(300 / 320, abs=1e-3)
    assert pretrained_data_config("shufflenet", True)["mean"] == (0.485, 0.456, 0.406)


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
