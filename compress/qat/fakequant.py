"""Fake-quant arithmetic with onnxruntime's rounding: int8 symmetric per-channel weights, uint8
asymmetric per-tensor activations with a min/max observer, int32 biases at scale s_input·s_weight."""

from __future__ import annotations

import torch
from torch import nn

W_QMIN, W_QMAX = -128, 127  # the int8 range ONNX QuantizeLinear accepts; weights use [-127, 127]
W_LEVELS = 127.0
A_QMIN, A_QMAX = 0, 255


def weight_levels(bits: int) -> float:
    """The largest integer of symmetric ``bits``-bit weights: 127 for 8 bits, 63 for 7."""
    return float(2 ** (bits - 1) - 1)


def host_weight_bits() -> int:
    """The widest weights whose int8 convolutions onnxruntime computes exactly on this machine: 8, or
    7 on an x86 CPU without VNNI. There, onnxruntime's uint8 × int8 kernels (AVX2) add the products
    of two neighbouring inputs in 16 bits with saturation (vpmaddubsw): 255·127·2 = 64770 overflows
    and the convolution differs from the int32 result; with 7-bit weights (±63) the sum stays within
    32767 and the result is exact again (onnxruntime's own advice: reduce_range on such CPUs)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return 8
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return 7  # an x86 whose features cannot be read: the form that is exact everywhere
    return 8 if ("avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags) else 7


def weight_scale(w: torch.Tensor, levels: float = W_LEVELS) -> torch.Tensor:
    """Per-output-channel symmetric scale: max|w| / levels (so values span [-levels, levels])."""
    amax = w.detach().abs().flatten(1).amax(dim=1)
    return (amax / float(levels)).clamp_min(1e-12).float()


def fake_quant_weight(w: torch.Tensor, levels: float = W_LEVELS) -> torch.Tensor:
    scale = weight_scale(w, levels)
    zp = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, W_QMIN, W_QMAX)


def weight_codes(w: torch.Tensor, levels: float = W_LEVELS) -> torch.Tensor:
    """The int8 weights the ONNX file stores, as float integers: those of :func:`fake_quant_weight`,
    which rounds w · (1/scale). Rounding w / scale instead lands on the other side of a half for about
    one weight in two million (a float32 quotient a hair from k + ½) and shifts that channel's output."""
    scale = weight_scale(w, levels).double().reshape(-1, *([1] * (w.dim() - 1)))
    return torch.round(fake_quant_weight(w.detach(), levels).double() / scale)


def fake_quant_onnx(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    """uint8 fake quantization with onnxruntime's QuantizeLinear arithmetic (x / scale in float32, round
    half to even, then the zero point added as an integer) rather than torch's x · (1/scale) + zp, so
    the PyTorch model and the int8 file round alike.
    Straight-through gradient inside the representable range, zero outside (as torch's op)."""
    s = torch.tensor(scale, dtype=torch.float32, device=x.device)
    t = x / s  # QuantizeLinear: divide in float32, round, then add the zero point as an integer
    q = torch.clamp(torch.round(t) + zp, A_QMIN, A_QMAX)
    y = (q - zp) * s
    inside = ((t >= A_QMIN - zp) & (t <= A_QMAX - zp)).to(x.dtype)
    return x * inside + (y - x * inside).detach()


def fake_quant_reinterpret(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
                           read_scale: torch.Tensor) -> torch.Tensor:
    """uint8 quantization at ``scale`` whose integers are read back at ``read_scale``: ONNX
    QuantizeLinear(scale) then DequantizeLinear(read_scale), an exact multiplication by
    read_scale/scale that costs nothing in the int8 graph. Straight-through gradient (times the ratio)
    inside the range, zero outside. Arguments are 0-d tensors (float32 scales, uint8 zero point)."""
    zp = zp.to(x.dtype)
    t = x / scale + zp
    q = torch.clamp(torch.round(t), A_QMIN, A_QMAX)
    ratio = read_scale / scale
    inside = ((t >= A_QMIN) & (t <= A_QMAX)).to(x.dtype)
    y = (q - zp) * read_scale
    return x * ratio * inside + (y - x * ratio * inside).detach()


class _QDQ(torch.autograd.Function):
    """QuantizeLinear(scale, zp) then DequantizeLinear(read_scale, zp) in the ONNX file."""

    @staticmethod
    def forward(ctx, x, scale, zp, read_scale):  # noqa: ARG004
        return fake_quant_reinterpret(x, scale, zp, read_scale)

    @staticmethod
    def symbolic(g, x, scale, zp, read_scale):
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zp), read_scale, zp)


def quantize_reinterpret(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, read_scale: torch.Tensor) -> torch.Tensor:
    """:func:`fake_quant_reinterpret`, exported as the QuantizeLinear/DequantizeLinear pair it stands for."""
    if torch.onnx.is_in_onnx_export():
        return _QDQ.apply(x, scale, zp, read_scale)
    return fake_quant_reinterpret(x, scale, zp, read_scale)


def fake_quant_bias(b: torch.Tensor, w_scale: torch.Tensor, input_fq: "ActFakeQuant | None",
                    force: bool = False) -> torch.Tensor:
    """The bias as the int8 graph holds it: int32 with scale s_input·s_weight (onnxruntime adds it to
    the integer accumulator). Without this, the PyTorch model and the int8 file round differently."""
    if input_fq is None or not input_fq.ready or not (input_fq.enabled or force):
        return b
    q, scale = bias_int32(b, w_scale, input_fq.qparams()[0])
    return b + ((q * scale).to(b.dtype) - b).detach()


def bias_int32(b: torch.Tensor, w_scale: torch.Tensor, s_x: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The int32 bias the int8 graph holds (as float64 integers) and its scale, float32(s_x·s_w)."""
    scale = (w_scale.double() * s_x).float().double()
    return torch.round(b.detach().double() / scale).clamp(-(2**31), 2**31 - 1), scale


class QATModule(nn.Module):
    """A module of the fake-quant model that takes another form for export (:meth:`to_frozen`)."""

    def to_frozen(self) -> nn.Module:
        raise NotImplementedError


class ActFakeQuant(QATModule):
    """Per-tensor asymmetric uint8 fake quantization with a moving-average min/max observer.

    ``observe`` updates the range (calibration and early QAT); ``enabled`` applies fake quantization.
    The range always contains 0 so that zero (padding, ReLU) is exact."""

    def __init__(self, momentum: float = 0.01):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.observe = True
        self.enabled = False
        self.accumulate = False  # calibration: the running min/max over everything seen
        self._tied: list = []  # another ActFakeQuant whose scale and zero point this one uses

    def tie(self, other: "ActFakeQuant") -> None:
        """Share ``other``'s quantization parameters: for a slice, reshape or shuffle of a tensor that is
        already quantized, whose values stay on the same int8 grid (what onnxruntime's quantizer does)."""
        self._tied[:] = [other]

    @property
    def ready(self) -> bool:
        return self._tied[0].ready if self._tied else bool(self.initialized)

    def reset(self) -> None:
        self.initialized.fill_(False)

    def qparams(self) -> tuple[float, int]:
        if self._tied:
            return self._tied[0].qparams()
        lo, hi = min(float(self.min_val), 0.0), max(float(self.max_val), 0.0)
        scale = max((hi - lo) / (A_QMAX - A_QMIN), 1e-8)
        zp = int(min(max(round(A_QMIN - lo / scale), A_QMIN), A_QMAX))
        return scale, zp

    def to_frozen(self) -> "ActFakeQuant":
        """Export form: the range fixed, fake quantization on (the same module)."""
        self.observe, self.enabled = False, True
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe and not self._tied:
            with torch.no_grad():
                lo, hi = torch.aminmax(x.detach())
                if not bool(self.initialized):
                    self.min_val.copy_(lo)
                    self.max_val.copy_(hi)
                    self.initialized.fill_(True)
                elif self.accumulate:
                    self.min_val.copy_(torch.minimum(self.min_val, lo))
                    self.max_val.copy_(torch.maximum(self.max_val, hi))
                else:
                    self.min_val.lerp_(lo, self.momentum)
                    self.max_val.lerp_(hi, self.momentum)
        if self.enabled and self.ready:
            scale, zp = self.qparams()
            if torch.onnx.is_in_onnx_export():  # becomes QuantizeLinear/DequantizeLinear
                return torch.fake_quantize_per_tensor_affine(x, scale, zp, A_QMIN, A_QMAX)
            return fake_quant_onnx(x, scale, zp)
        return x
