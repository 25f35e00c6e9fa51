"""The QAT modules and their paired converters: ``QConvBn2d.from_float(conv, bn)`` /
``QConvBn2d.to_frozen()`` and ``QLinear.from_float(linear)`` / ``QLinear.to_frozen()``; the frozen
forms are what the ONNX exporter turns into QuantizeLinear/DequantizeLinear around int8 weights.
Every module that changes for export derives from :class:`QATModule`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError
from compress.qat.fakequant import (A_QMAX, A_QMIN, W_LEVELS, W_QMAX, W_QMIN, ActFakeQuant, QATModule, bias_int32, fake_quant_bias,
                                    fake_quant_weight, quantize_reinterpret, weight_scale, weight_codes)


class QConvBn2d(QATModule):
    """Conv2d with the following BatchNorm folded in, weights fake-quantized per channel.

    Training (BN not frozen): w' = fq(W·γ/σ_running); y = conv(x, w')·σ_running/γ, then normalized with
    the batch statistics (which also update the running ones), as in Jacob et al. 2018, section 3.2.
    Frozen BN or eval: y = conv(x, fq(W·γ/σ)) + (b − μ)·γ/σ + β — exactly the exported int8 graph.
    In eval with fake quantization on and both activation quantizers set, the layer computes what
    onnxruntime's QLinearConv computes, to the bit (:func:`requantized_conv`)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None):
        super().__init__()
        self.conv, self.bn = conv, bn
        self.freeze_bn = False
        self.quantize_weight = False
        self.keep_float = False  # a layer the int8 file runs in float (the stem: see prepare_qat)
        self._input_fq: list = []  # the ActFakeQuant of this layer's input (not a submodule)
        self._output_fq: list = []  # the one that quantizes its output (after a ReLU, if one follows)
        self.register_buffer("w_levels", torch.tensor(W_LEVELS))  # 127: 8-bit weights, 63: 7-bit

    @property
    def output_fq(self) -> "ActFakeQuant | None":
        return self._output_fq[0] if self._output_fq else None

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> "QConvBn2d":
        return cls(conv, bn)

    def to_frozen(self) -> nn.Module:
        if self.keep_float:
            w, b = self.folded()
            c = self.conv
            conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                             bias=True).to(w.device)
            with torch.no_grad():
                conv.weight.copy_(w)
                conv.bias.copy_(b)
            return conv
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
        quantized = self.quantize_weight and not self.keep_float
        levels = float(self.w_levels)
        q = (lambda t: fake_quant_weight(t, levels)) if quantized else (lambda t: t)
        bn = self.bn
        if bn is not None and self.training and not self.freeze_bn:
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
        if (not self.training and quantized and _enabled(self.input_fq) and _enabled(self.output_fq)
                and not torch.onnx.is_in_onnx_export()):
            return requantized_conv(x, w, b, self.input_fq, self.output_fq, self._conv, levels)
        if quantized:
            b = fake_quant_bias(b, weight_scale(w, levels), self.input_fq)
        return self._conv(x, q(w), b)


def _enabled(fq) -> bool:
    return fq is not None and fq.ready and fq.enabled


@torch.no_grad()
def requantized_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, input_fq: ActFakeQuant, output_fq: ActFakeQuant,
                     conv, levels: float = W_LEVELS) -> torch.Tensor:
    """The convolution as onnxruntime's QLinearConv runs it on x86: the exact int32 accumulator of the
    int8 weights and the uint8 input (minus its zero point) plus the int32 bias, converted to float32,
    times the float32 multiplier (s_x · s_w) / s_y, rounded half to even, zero point added, saturated;
    returned dequantized (q − z_y)·s_y, so the output quantizer that follows leaves it unchanged.
    Float convolution of the dequantized values rounds differently near ties, and those one-step flips,
    amplified by the layers after them, are what made the int8 file disagree with the PyTorch model."""
    s_x, _ = input_fq.qparams()
    s_y, z_y = output_fq.qparams()
    s_w = weight_scale(w, levels)
    sx32, sy32 = _f(s_x), _f(s_y)
    w_int = weight_codes(w, levels)
    x_int = torch.round(x / sx32)  # x is on its grid: (q - z_x)·s_x
    acc = conv(x_int.double(), w_int.double(), None)  # exact: integers far below 2^53
    per_channel = (1, -1, *([1] * (acc.dim() - 2)))
    acc = acc + bias_int32(b, s_w, s_x)[0].reshape(per_channel)
    multiplier = (sx32 * s_w.to(_F32)) / sy32
    v = acc.to(_F32) * multiplier.reshape(per_channel)
    q = torch.clamp(torch.round(v), A_QMIN - z_y, A_QMAX - z_y)
    return (q * sy32).to(x.dtype)


class QLinear(QATModule):
    """Linear layer with weights fake-quantized per output feature."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.quantize_weight = False
        self._input_fq: list = []
        self.register_buffer("w_levels", torch.tensor(W_LEVELS))

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
        levels = float(self.w_levels)
        if b is not None:
            b = fake_quant_bias(b, weight_scale(self.linear.weight, levels), self.input_fq)
        return F.linear(x, fake_quant_weight(self.linear.weight, levels), b)


class FrozenQConv2d(nn.Module):
    """Export form of :class:`QConvBn2d`: folded float weight and bias as buffers, per-channel weight
    fake-quant that the ONNX exporter turns into QuantizeLinear/DequantizeLinear."""

    def __init__(self, q: QConvBn2d):
        super().__init__()
        w, b = q.folded()
        # weights snapped to their int8 grid: QuantizeLinear of these values gives back exactly the
        # integers training used, whatever the rounding of the division
        levels = float(q.w_levels)
        self.register_buffer("weight", fake_quant_weight(w.detach(), levels).clone())
        self.register_buffer("bias", fake_quant_bias(b, weight_scale(w, levels), q.input_fq, force=True).detach().clone())
        self.register_buffer("scale", weight_scale(w, levels))
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
        levels = float(q.w_levels)
        self.register_buffer("weight", fake_quant_weight(q.linear.weight.detach(), levels).clone())
        b = q.linear.bias
        b = b.detach() if b is not None else torch.zeros(self.weight.shape[0])
        self.register_buffer("bias", fake_quant_bias(b, weight_scale(q.linear.weight, levels), q.input_fq,
                                                     force=True).detach().clone())
        self.register_buffer("scale", weight_scale(self.weight, levels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zp = torch.zeros_like(self.scale, dtype=torch.int32)
        w = torch.fake_quantize_per_channel_affine(self.weight, self.scale, zp, 0, W_QMIN, W_QMAX)
        return F.linear(x, w, self.bias)


class QHardsigmoid(QATModule):
    """hardsigmoid(x) = clip(x + 3, 0, 6) / 6 in the form onnxruntime runs with int8 kernels only.

    x + 3 is an add of two quantized tensors (QLinearAdd) whose output is quantized on [0, 6] (uint8,
    scale 6/255, zero point 0, so the clip is the saturation), and its integers are read back at scale
    1/255, which divides by 6 exactly: the gate leaves the int8 graph as uint8 on [0, 1]. Hard-swish is
    x · hardsigmoid(x), a QLinearMul. onnxruntime has no int8 kernel for HardSigmoid or HardSwish: run
    as float they cost a dequantize, two float passes and a quantize each, which made MobileNetV3's int8
    file slower than its float one. With fake quantization off this is the float hardsigmoid."""

    ADD_SCALE, READ_SCALE = 6.0 / A_QMAX, 1.0 / A_QMAX

    def __init__(self):
        super().__init__()
        self.enabled = False
        self._input_fq: list = []
        # constants of the int8 graph (not state: a checkpoint does not carry them)
        self.register_buffer("add_scale", torch.tensor(self.ADD_SCALE), persistent=False)
        self.register_buffer("read_scale", torch.tensor(self.READ_SCALE), persistent=False)
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.uint8), persistent=False)

    # read as the quantizer of its output by a layer it feeds (bias scale s_input·s_weight)
    ready = True

    def qparams(self) -> tuple[float, int]:
        return self.READ_SCALE, 0

    def to_frozen(self) -> "QHardsigmoid":
        self.enabled = True
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.hardsigmoid(x)
        fq = self._input_fq[0] if self._input_fq else None
        if not self.training and _enabled(fq) and not torch.onnx.is_in_onnx_export():
            # QLinearAdd with the constant (uint8 255 at scale 3/255), output on [0, 6] at 6/255
            s_x, z_x = fq.qparams()
            q = qlinear_add(_ints(x, s_x, z_x), s_x, z_x, torch.tensor(255.0), 3.0 / A_QMAX, 0, self.ADD_SCALE, 0)
            return (q * self.read_scale).to(x.dtype)
        # the int8 file holds 3 as a quantized constant (finalize_qdq), so the add is a QLinearAdd
        return quantize_reinterpret(x + 3.0, self.add_scale, self.zero_point, self.read_scale)


class QAddMul(QATModule):
    """An add or multiply of two quantized tensors whose result is quantized: onnxruntime's QLinearAdd /
    QLinearMul. In eval with its quantizers set it computes what those kernels compute on x86, to the
    bit (:func:`qlinear_add`, :func:`qlinear_mul`); otherwise the float operation."""

    def __init__(self, op: str):
        super().__init__()
        if op not in ("add", "mul"):
            raise ValueError(op)
        self.op = op
        self._fqs: list = []  # quantizers of input a, input b and the output

    def to_frozen(self) -> "QAddMul":
        return self

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if (not self.training and len(self._fqs) == 3 and all(_enabled(f) for f in self._fqs)
                and not torch.onnx.is_in_onnx_export()):
            (sa, za), (sb, zb), (sc, zc) = (f.qparams() for f in self._fqs)
            kernel = qlinear_add if self.op == "add" else qlinear_mul
            q = kernel(_ints(a, sa, za), sa, za, _ints(b, sb, zb), sb, zb, sc, zc)
            return ((q - zc) * torch.tensor(sc, dtype=torch.float32)).to(a.dtype)
        return a + b if self.op == "add" else a * b


class QGlobalAvgPool(QATModule):
    """Global average pooling of a quantized tensor whose result is quantized: onnxruntime's
    QLinearGlobalAveragePool. In eval with both quantizers set it computes what that kernel computes on
    x86, to the bit (:func:`qlinear_global_avg_pool`); otherwise the float mean."""

    def __init__(self):
        super().__init__()
        self._fqs: list = []  # quantizers of the input and the output

    def to_frozen(self) -> "QGlobalAvgPool":
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training and len(self._fqs) == 2 and all(_enabled(f) for f in self._fqs)
                and not torch.onnx.is_in_onnx_export()):
            (sx, zx), (sy, zy) = (f.qparams() for f in self._fqs)
            q = qlinear_global_avg_pool(_ints(x, sx, zx), sx, zx, sy, zy)
            return ((q - zy) * _f(sy)).to(x.dtype)
        return F.adaptive_avg_pool2d(x, 1)


@torch.no_grad()
def qlinear_global_avg_pool(x, sx, zx, sy, zy) -> torch.Tensor:
    """onnxruntime's x86 QLinearGlobalAveragePool: the exact int32 sum of each channel minus zx·N,
    converted to float32, times the float32 sx / (sy·N), rounded half to even, plus zy, saturated."""
    n = x.shape[-1] * x.shape[-2]
    acc = x.double().sum(dim=(-2, -1), keepdim=True) - zx * n
    scale = _f(sx) / (_f(sy) * _f(float(n)))
    return torch.clamp(torch.round(acc.to(_F32) * scale) + zy, A_QMIN, A_QMAX)


def _ints(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    """The uint8 values (as float32) of a tensor on the grid of (scale, zp)."""
    return torch.round(x.float() / torch.tensor(scale, dtype=torch.float32)) + zp


_F32 = torch.float32


def _f(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=_F32)


@torch.no_grad()
def qlinear_mul(a, sa, za, b, sb, zb, sc, zc) -> torch.Tensor:
    """onnxruntime's x86 QLinearMul: (a − za)(b − zb) exactly, times the float32 ratio sa·sb/sc, plus zc,
    rounded half to even, saturated to uint8."""
    ratio = (_f(sa) * _f(sb)) / _f(sc)
    prod = (a.double() - za) * (b.double() - zb)
    v = prod.to(_F32) * ratio + _f(zc)
    return torch.clamp(torch.round(v), A_QMIN, A_QMAX)


@torch.no_grad()
def qlinear_add(a, sa, za, b, sb, zb, sc, zc) -> torch.Tensor:
    """onnxruntime's x86 QLinearAdd (its AVX2 kernel): with ra = sa/sc and rb = sb/sc in float32, the
    fixed part zc − fma(ra, za, rb·zb), then fma(a, ra, fma(b, rb, fixed)) — each fused multiply-add
    rounded once to float32 — rounded half to even and saturated to uint8. A scalar operand joins the
    fixed part with a separate multiply and add. Checked against onnxruntime on every (a, b) pair for
    300 random scale and zero-point sets: no value differs (a plain multiply-then-add differs on ties)."""
    ra, rb = _f(sa) / _f(sc), _f(sb) / _f(sc)
    fixed = _f(zc) - _fma(ra, _f(za), rb * _f(zb))
    if b.numel() == 1:  # a scalar operand joins the fixed part
        fixed = fixed + b.reshape(()).to(_F32) * rb
        return torch.clamp(torch.round(_fma(a, ra, fixed)), A_QMIN, A_QMAX)
    return torch.clamp(torch.round(_fma(a, ra, _fma(b, rb, fixed))), A_QMIN, A_QMAX)


def _fma(x, y, z) -> torch.Tensor:
    """x·y + z rounded once to float32, for float32 operands whose product float64 holds exactly (the
    uint8 values and ratios here): the float64 result is exact, so one rounding remains."""
    return (torch.as_tensor(x).double() * torch.as_tensor(y).double() + torch.as_tensor(z).double()).to(_F32)
