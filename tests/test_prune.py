"""Structured pruning: channels really removed, outputs intact, architecture stored and reloaded."""

import pytest
import torch

from compress.config import validate_recipe
from compress.errors import ConfigError
from compress.metrics import count_macs, count_params
from compress.models import apply_architecture, architecture, create_model, load_checkpoint, save_checkpoint
from compress.prune import build_pruners, plan, prune_to
from conftest import EDGE_MODELS, done_stages


def _pruned(name, target=0.5, importance="l2", size=32):
    torch.manual_seed(0)
    model = create_model(name, 10).eval()
    base = count_macs(model, size)
    p = plan(model, size, 10)
    build_pruners(p, importance, 0.9, 30, 8, False)
    grad_fn = None
    if importance == "taylor":
        def grad_fn():
            model(torch.randn(4, 3, size, size)).sum().backward()
    prune_to(model, p, int(base * target), size, grad_fn)
    return model, base, p


@pytest.mark.parametrize("name", EDGE_MODELS)
def test_pruning_removes_channels_and_keeps_the_network_whole(name, tmp_path):
    model, base, p = _pruned(name)
    macs = count_macs(model, 32)
    assert macs <= 0.7 * base  # at least 30% fewer MACs at a 50% target
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # the classifier is never pruned
    assert [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)][-1] == 10
    # pruned channel counts are multiples of 8 (round_to=8)
    fresh = dict(create_model(name, 10).named_modules())
    pruned = [m for n, m in model.named_modules()
              if isinstance(m, torch.nn.Conv2d) and m.out_channels != fresh[n].out_channels]
    assert pruned and all(c.out_channels % 8 == 0 for c in pruned)
    # the pruned checkpoint reloads: the architecture is stored beside the weights
    path = tmp_path / "pruned.safetensors"
    save_checkpoint(model, path, {"model": name, "num_classes": 10, "arch": architecture(model)})
    again, _ = load_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(again(x), out)
    assert count_params(again) == count_params(model) < count_params(create_model(name, 10))


def test_shufflenet_parts_that_cross_the_shuffle_stay_whole():
    model, _, p = _pruned("shufflenet_v2_x1_0")
    assert p.left_whole and any("shuffle" in part for part in p.left_whole)
    fresh = create_model("shufflenet_v2_x1_0", 10)
    assert model.conv5[0].in_channels == fresh.conv5[0].in_channels
    for blk, ref in zip(model.stage2, fresh.stage2):
        assert blk.branch2[-3].out_channels == ref.branch2[-3].out_channels  # last 1x1 of the branch
        assert blk.branch2[0].out_channels < ref.branch2[0].out_channels  # inner channels pruned


@pytest.mark.parametrize("importance", ["l1", "bn_scale", "taylor"])
def test_every_importance_prunes(importance):
    model, base, _ = _pruned("mobilenetv2_035", importance=importance)
    assert count_macs(model, 32) <= 0.7 * base


def test_architecture_must_match_the_model():
    from compress.errors import CompressError

    with pytest.raises(CompressError, match="does not have"):
        apply_architecture(create_model("mobilenetv2_035", 10), {"no.such.layer": {"features": 8}})


def test_prune_config_needs_exactly_one_target():
    with pytest.raises(ConfigError, match="exactly one of macs_target and channel_ratio"):
        validate_recipe({"name": "x", "prune": {"macs_target": 0.5, "channel_ratio": 0.3}})
    with pytest.raises(ConfigError, match="prune.macs_target"):
        validate_recipe({"name": "x", "prune": {"macs_target": 1.5}})
    cfg = validate_recipe({"name": "x", "prune": {"macs_target": None, "channel_ratio": 0.3}})
    assert cfg.prune.channel_ratio == 0.3


@pytest.mark.parametrize("global_pruning", [False, True])
def test_the_prune_stage_follows_the_channel_ratio_per_layer_or_over_the_network(global_pruning, tmp_path):
    """``prune.channel_ratio`` in one step: each pruned layer keeps 1 - ratio of its channels, or with
    ``global_pruning`` the network as a whole does while the layers' shares differ."""
    import json

    from compress import stages
    from compress.pipeline import run_stage

    ratio = 0.25
    ctx = done_stages(tmp_path, {"stages": ["teacher", "distill", "prune"],
                                 "prune": {"macs_target": None, "channel_ratio": ratio, "round_to": None,
                                           "global_pruning": global_pruning, "iterative_steps": 1, "epochs": 0,
                                           "final_epochs": 0}},
                      {"teacher": "mobilenetv3_small_050", "distill": "mobilenetv2_035"})
    metrics = run_stage(ctx, stages.get("prune")).metrics
    assert metrics["target"] == {"channel_ratio": ratio}
    before = architecture(create_model("mobilenetv2_035", 10))
    after = json.loads((ctx.stage_dir("prune") / "model.json").read_text())["arch"]
    convs = [n for n, spec in before.items() if "groups" in spec]
    pruned = [n for n in convs if after[n]["out"] != before[n]["out"]]
    assert len(pruned) > len(convs) / 2
    kept = {n: after[n]["out"] / before[n]["out"] for n in pruned}
    total = sum(after[n]["out"] for n in pruned) / sum(before[n]["out"] for n in pruned)
    if global_pruning:
        assert max(kept.values()) - min(kept.values()) > 0.1, kept
        assert total == pytest.approx(1 - ratio, abs=0.05)
    else:
        assert all(abs(after[n]["out"] - (1 - ratio) * before[n]["out"]) < 1 for n in pruned), kept
    # the stored architecture is the model's: the checkpoint reloads at that size
    model, _ = load_checkpoint(ctx.stage_dir("prune") / "model.safetensors")
    assert architecture(model) == after and count_params(model) == metrics["params"]
