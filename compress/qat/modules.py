"""The QAT modules and their paired converters: ``QConvBn2d.from_float(conv, bn)`` /
``QConvBn2d.to_frozen()`` and ``QLinear.from_float(linear)`` / ``QLinear.to_frozen()``; the frozen
forms are what the ONNX exporter turns into QuantizeLinear/DequantizeLinear around int8 weights.
Every module that changes for export derives from :class:`QATModule`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError
from compress.qat.fakequant import (W_QMAX, W_QMIN, ActFakeQuant, QATModule, fake_quant_bias, fake_quant_weight,
                                    weight_scale)


class QConvBn2d(QATModule):
    """Conv2d with the following BatchNorm folded in, weights fake-quantized per channel.

    Training (BN not frozen): w' = fq(W·γ/σ_running); y = conv(x, w')·σ_running/γ, then normalized with
    the batch statistics (which also update the running ones), as in Jacob et al. 2018, section 3.2.
    Frozen BN or eval: y = conv(x, fq(W·γ/σ)) + (b − μ)·γ/σ + β — exactly the exported int8 graph."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None):
        super().__init__()
        self.conv, self.bn = conv, bn
        self.freeze_bn = False
        self.quantize_weight = False
        self._input_fq: list = []  # the ActFakeQuant of this layer's input (not a submodule)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> "QConvBn2d":
        return cls(conv, bn)

    def to_frozen(self) -> "FrozenQConv2d":
        return FrozenQConv2d(self)

    @property
    def input_fq(self) -> "ActFakeQuant | None":
        return self._input_fq[0] if self._input_fq else None

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        c = self.conv
        if c.padding_mode != "zeros":
            raise CompressError(f"QAT supports zero padding only, got {c.padding_mode}")
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float weight and bias of the folded convolution (BN running statistics)."""
        w = self.conv.weight
        b = self.conv.bias if self.conv.bias is not None else torch.zeros(w.shape[0], device=w.device)
        if self.bn is None:
            return w, b
        bn = self.bn
        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return w * factor.reshape(-1, 1, 1, 1), (b - bn.running_mean) * factor + bn.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = fake_quant_weight if self.quantize_weight else (lambda t: t)
        if self.bn is None:
            b = self.conv.bias
            if b is not None and self.quantize_weight:
                b = fake_quant_bias(b, weight_scale(self.conv.weight), self.input_fq)
            return self._conv(x, q(self.conv.weight), b)
        bn = self.bn
        if self.training and not self.freeze_bn:
            std = torch.sqrt(bn.running_var + bn.eps)
            factor = bn.weight / std
            # a channel whose BatchNorm scale is exactly zero (timm's zero_init_last residual BN) would
            # give 0/0: its weight is quantized unscaled instead, so batch_norm still sees the conv output
            factor = torch.where(factor == 0, torch.ones_like(factor), factor)
            y = self._conv(x, q(self.conv.weight * factor.reshape(-1, 1, 1, 1)), None)
            y = y / factor.reshape(1, -1, 1, 1)
            if self.conv.bias is not None:
                y = y + self.conv.bias.reshape(1, -1, 1, 1)
            return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, bn.momentum or 0.1, bn.eps)
        w, b = self.folded()
        if self.quantize_weight:
            b = fake_quant_bias(b, weight_scale(w), self.input_fq)
        return self._conv(x, q(w), b)


class QLinear(QATModule):
    """Linear layer with weights fake-quantized per output feature."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.quantize_weight = False
        self._input_fq: list = []

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "QLinear":
        return cls(linear)

    def to_frozen(self) -> "FrozenQLinear":
        return FrozenQLinear(self)

    @property
    def input_fq(self) -> "ActFakeQuant | None":
        return self._input_fq[0] if self._input_fq else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize_weight:
            return F.linear(x, self.linear.weight, self.linear.bias)
        b = self.linear.bias
        if b is not None:
            b = fake_quant_bias(b, weight_scale(self.linear.weight), self.input_fq)
        return F.linear(x, fake_quant_weight(self.linear.weight), b)


class FrozenQConv2d(nn.Module):
    """Export form of :class:`QConvBn2d`: folded float weight and bias as buffers, per-channel weight
    fake-quant that the ONNX exporter turns into QuantizeLinear/DequantizeLinear."""

    def __init__(self, q: QConvBn2d):
        super().__init__()
        w, b = q.folded()
        # weights snapped to their int8 grid: QuantizeLinear of these values gives back exactly the
        # integers training used, whatever the rounding of the division
        self.register_buffer("weight", fake_quant_weight(w.detach()).clone())
        self.register_buffer("bias", fake_quant_bias(b, weight_scale(w), q.input_fq, force=True).detach().clone())
        self.register_buffer("scale", weight_scale(w))
        c = q.conv
        self.stride, self.padding, self.dilation, self.groups = c.stride, c.padding, c.dilation, c.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zp = torch.zeros_like(self.scale, dtype=torch.int32)
        w = torch.fake_quantize_per_channel_affine(self.weight, self.scale, zp, 0, W_QMIN, W_QMAX)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FrozenQLinear(nn.Module):
    """Export form of :class:`QLinear`."""

    def __init__(self, q: QLinear):
        super().__init__()
        self.register_buffer("weight", fake_quant_weight(q.linear.weight.detach()).clone())
        b = q.linear.bias
        b = b.detach() if b is not None else torch.zeros(self.weight.shape[0])
        self.register_buffer("bias", fake_quant_bias(b, weight_scale(q.linear.weight), q.input_fq, force=True).detach().clone())
        self.register_buffer("scale", weight_scale(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zp = torch.zeros_like(self.scale, dtype=torch.int32)
        w = torch.fake_quantize_per_channel_affine(self.weight, self.scale, zp, 0, W_QMIN, W_QMAX)
        return F.linear(x, w, self.bias)
