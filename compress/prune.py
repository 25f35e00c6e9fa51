"""Structured pruning: whole channels removed through torch-pruning's dependency graph, so convolution
weights, BatchNorm and the next layer's inputs shrink together, and the file, the MACs and the latency
really drop.

ShuffleNetV2's channel split and shuffle are outside what torch-pruning's tracer handles (it fails inside
its shuffle handling), so for torchvision's ShuffleNet each block's inner branch is pruned on its own:
the hidden channels between the branch's first 1×1 convolution and its last one, which never cross the
split, the concatenation or the shuffle. The parts left whole are named in the stage's metrics.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from compress.errors import CompressError, short
from compress.metrics import count_macs

IMPORTANCES = ("l1", "l2", "bn_scale", "taylor")


def importance(name: str):
    import torch_pruning as tp

    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    if name == "taylor":
        return tp.importance.TaylorImportance()
    raise CompressError(f"unknown importance {name!r}; valid: {', '.join(IMPORTANCES)}")


def classifier_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """The layers that produce the logits: never pruned."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes] or \
           [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]


@dataclass
class PruneUnit:
    """One torch-pruning pruner over a module (the whole network, or one ShuffleNet branch)."""

    module: nn.Module
    example: torch.Tensor
    ignored: list[nn.Module]
    name: str
    pruner: object = None


@dataclass
class Plan:
    units: list[PruneUnit]
    left_whole: list[str] = field(default_factory=list)


def _is_torchvision_shufflenet(model: nn.Module) -> bool:
    try:
        from torchvision.models.shufflenetv2 import ShuffleNetV2
    except ImportError:
        return False
    return isinstance(model, ShuffleNetV2)


def plan(model: nn.Module, image_size: int, num_classes: int) -> Plan:
    if not _is_torchvision_shufflenet(model):
        return Plan([PruneUnit(model, torch.zeros(1, 3, image_size, image_size), classifier_layers(model, num_classes), "network")])
    # record each branch2's input shape with a forward pass, then prune branches one by one
    shapes: dict[str, torch.Size] = {}
    hooks = []
    for name, m in model.named_modules():
        if name.endswith("branch2"):
            hooks.append(m.register_forward_hook(lambda mod, inp, out, n=name: shapes.__setitem__(n, inp[0].shape)))
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    model.train(was)
    for h in hooks:
        h.remove()
    units = []
    for name, m in model.named_modules():
        if name.endswith("branch2"):
            last = [c for c in m.modules() if isinstance(c, nn.Conv2d)][-1]
            units.append(PruneUnit(m, torch.zeros(shapes[name]), [last], name))
    left = ["conv1 (stem)", "every branch1 (stride-2 shortcut)", "the last 1×1 convolution of every branch2",
            "conv5", "fc: their channels cross ShuffleNet's channel split, concatenation or shuffle"]
    return Plan(units, left)


def build_pruners(p: Plan, imp_name: str, max_ratio: float, steps: int, round_to: int | None,
                  global_pruning: bool) -> None:
    import torch_pruning as tp

    for u in p.units:
        try:
            u.pruner = tp.pruner.MetaPruner(
                u.module, u.example, importance=importance(imp_name), pruning_ratio=max_ratio,
                iterative_steps=steps, ignored_layers=u.ignored, round_to=round_to, global_pruning=global_pruning,
            )
        except Exception as e:  # noqa: BLE001
            raise CompressError(f"torch-pruning cannot trace {u.name} of {type(u.module).__name__}: "
                                f"{short(e, 120)}") from None


def prune_to(model: nn.Module, p: Plan, macs_goal: int, image_size: int,
             grad_fn: Callable[[], None] | None = None) -> int:
    """Take pruning sub-steps until the model's MACs are at most ``macs_goal`` or nothing is left to
    prune; ``grad_fn`` fills gradients first (Taylor importance). Returns the MACs reached."""
    macs = count_macs(model, image_size)
    while macs > macs_goal:
        progressed = False
        for u in p.units:
            if u.pruner.current_step >= u.pruner.iterative_steps:
                continue
            if grad_fn is not None:
                model.zero_grad(set_to_none=True)
                grad_fn()
            u.pruner.step()
            progressed = True
        if not progressed:
            break
        macs = count_macs(model, image_size)
    return macs


def channel_report(before: dict, after: dict) -> dict:
    changed = {n: (before[n].get("out", before[n].get("features")), after[n].get("out", after[n].get("features")))
               for n in after if n in before and before[n] != after[n]}
    return {"layers_changed": len(changed), "layers_total": len(after)}


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
