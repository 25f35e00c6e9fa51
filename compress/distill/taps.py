"""Feature taps: forward hooks on named layers, so features are read without editing the model.

``feature_points`` finds a model's stages (timm's ``feature_info`` when the model has it, its top-level
children otherwise) and measures each one's channels and stride with one probe forward pass;
``match_points`` pairs teacher and student stages of equal stride."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import CompressError

EMBEDDING = "<classifier input>"


@dataclass(frozen=True)
class FeaturePoint:
    name: str
    channels: int
    reduction: int
    height: int


def classifier(model: nn.Module) -> nn.Linear:
    """The last linear layer: its input is the penultimate embedding."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise CompressError(f"{type(model).__name__} has no linear classifier to tap")
    return last


def _candidate_names(model: nn.Module) -> list[str]:
    info = getattr(model, "feature_info", None)
    if info is not None:
        dicts = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
        names = [d["module"] for d in dicts if isinstance(d, dict) and "module" in d]
        if names:
            return names
    head = classifier(model)
    return [n for n, m in model.named_children() if m is not head and any(True for _ in m.parameters())]


@torch.no_grad()
def probe(model: nn.Module, names: list[str], image_size: int) -> dict[str, tuple[int, ...]]:
    """Output shape of each named layer, from one eval-mode forward pass of a blank image."""
    taps = Taps(model, names)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, 3, image_size, image_size, device=device))
        return {n: tuple(t.shape) for n, t in taps.out.items() if hasattr(t, "shape")}
    finally:
        taps.remove()
        model.train(was_training)


def feature_points(model: nn.Module, image_size: int) -> list[FeaturePoint]:
    """The model's stages, deepest per stride, from shallow to deep."""
    names = _candidate_names(model)
    shapes = probe(model, names, image_size)
    by_reduction: dict[int, FeaturePoint] = {}
    for n in names:
        shape = shapes.get(n)
        if shape is None or len(shape) != 4:
            continue
        red = max(1, round(image_size / shape[-1]))
        by_reduction[red] = FeaturePoint(n, shape[1], red, shape[-1])  # later (deeper) wins
    return [by_reduction[r] for r in sorted(by_reduction)]


def match_points(teacher: list[FeaturePoint], student: list[FeaturePoint]) -> list[tuple[FeaturePoint, FeaturePoint]]:
    """Teacher and student stages of the same stride, shallow to deep; the stem (stride ≤ 2) is left out."""
    s_by = {p.reduction: p for p in student}
    pairs = [(t, s_by[t.reduction]) for t in teacher if t.reduction in s_by and t.reduction > 2]
    if not pairs:
        raise CompressError("teacher and student share no feature stage of equal stride to distill between")
    return pairs


class Taps:
    """Forward hooks that keep the latest output of each named layer (and, with ``embedding``, the input
    of the classifier). ``remove()`` takes every hook off again."""

    def __init__(self, model: nn.Module, names: list[str], embedding: bool = False):
        self.out: dict[str, torch.Tensor] = {}
        self._handles = []
        for n in names:
            try:
                module = model.get_submodule(n)
            except AttributeError:
                raise CompressError(f"no layer named {n!r} in {type(model).__name__}") from None
            self._handles.append(module.register_forward_hook(lambda m, a, out, n=n: self.out.__setitem__(n, out)))
        if embedding:
            self._handles.append(classifier(model).register_forward_pre_hook(
                lambda m, args: self.out.__setitem__(EMBEDDING, args[0].flatten(1))))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.out[name]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.out.clear()
