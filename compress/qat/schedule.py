"""The QAT switches and their schedule: fake quantization on or off, observers updating or frozen,
BatchNorm statistics updating or frozen; calibration of every activation range; the final inference
state of a fake-quant model."""

from __future__ import annotations

import torch
from torch import nn

from compress.qat.fakequant import ActFakeQuant
from compress.qat.modules import QConvBn2d, QHardsigmoid, QLinear


def _modules(gm: nn.Module, kind):
    return [m for m in gm.modules() if isinstance(m, kind)]


def enable_fake_quant(gm: nn.Module, enabled: bool = True) -> None:
    for m in _modules(gm, ActFakeQuant):
        m.enabled = enabled
    for m in _modules(gm, (QConvBn2d, QLinear)):
        m.quantize_weight = enabled
    for m in _modules(gm, QHardsigmoid):
        m.enabled = enabled


def set_observers(gm: nn.Module, observe: bool) -> None:
    for m in _modules(gm, ActFakeQuant):
        m.observe = observe


def freeze_bn(gm: nn.Module, frozen: bool = True) -> None:
    for m in _modules(gm, QConvBn2d):
        m.freeze_bn = frozen


@torch.no_grad()
def calibrate(gm: nn.Module, batches) -> int:
    """Set every activation range to the min/max of the float model's activations over ``batches``
    (eval mode, fake quantization off), as onnxruntime's MinMax calibration does. Returns images seen."""
    was = gm.training
    gm.eval()
    enable_fake_quant(gm, False)
    observers = _modules(gm, ActFakeQuant)
    for m in observers:
        m.reset()
        m.observe, m.accumulate = True, True
    seen = 0
    for x in batches:
        gm(x)
        seen += len(x)
    for m in observers:
        m.accumulate = False
    gm.train(was)
    return seen


def qat_summary(gm: nn.Module) -> dict:
    convs = _modules(gm, QConvBn2d)
    return {"convolutions": len(convs), "float_convolutions": sum(c.keep_float for c in convs),
            "batchnorms_folded": sum(c.bn is not None for c in convs),
            "linear_layers": len(_modules(gm, QLinear)), "activation_quantizers": len(_modules(gm, ActFakeQuant))}


def qat_schedule(gm: nn.Module, epoch: int, freeze_observers_after: int, freeze_bn_after: int) -> None:
    """State of the QAT switches at the start of ``epoch`` (0-based), a pure function of the epoch so a
    resumed run sees exactly what an uninterrupted one saw."""
    enable_fake_quant(gm, True)
    set_observers(gm, epoch < freeze_observers_after)
    freeze_bn(gm, epoch >= freeze_bn_after)
