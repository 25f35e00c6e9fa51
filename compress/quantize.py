"""Quantization-aware training that exports to an ONNX QDQ model onnxruntime runs with int8 kernels.

Scheme (the one onnxruntime's own static quantizer produces, so the same fused kernels apply):
weights int8, symmetric, per output channel (zero point 0, scale max|w|/127); activations uint8,
asymmetric, per tensor. Two explicit steps, as in torchao: :func:`prepare_qat` rewrites a float model
into a fake-quant one (BatchNorm folded into the preceding convolution, observers on every tensor the
int8 graph will hold), training follows with the one training loop, and :func:`export_qdq` writes the
int8 ONNX file (weights stored as int8, biases as int32, activations as Q/DQ pairs).

The placement of activation fake-quant mirrors what onnxruntime fuses: every convolution and linear
layer reads a quantized tensor and writes one; a ReLU/ReLU6 that is the only reader of a convolution or
an add is quantized after the activation (onnxruntime folds it into the requantization); adds,
multiplies, concatenations, poolings, channel shuffles and other activations write quantized tensors
too. Reshapes, transposes, slices and flattens are left alone: they move int8 data as it is.
"""

from __future__ import annotations

import copy
import operator
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError

W_QMIN, W_QMAX = -128, 127  # the int8 range ONNX QuantizeLinear accepts; weights use [-127, 127]
W_LEVELS = 127.0
A_QMIN, A_QMAX = 0, 255


# -- fake-quant building blocks ---------------------------------------------------------------


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric scale: max|w| / 127 (so values span [-127, 127])."""
    amax = w.detach().abs().flatten(1).amax(dim=1)
    return (amax / W_LEVELS).clamp_min(1e-12).float()


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    scale = weight_scale(w)
    zp = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, W_QMIN, W_QMAX)


def fake_quant_onnx(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    """uint8 fake quantization with ONNX QuantizeLinear's arithmetic (x / scale, round half to even)
    rather than torch's x · (1/scale), so the PyTorch model and the int8 file round alike.
    Straight-through gradient inside the representable range, zero outside (as torch's op)."""
    t = x / scale + zp
    q = torch.clamp(torch.round(t), A_QMIN, A_QMAX)
    y = (q - zp) * scale
    inside = ((t >= A_QMIN) & (t <= A_QMAX)).to(x.dtype)
    return x * inside + (y - x * inside).detach()


def fake_quant_bias(b: torch.Tensor, w_scale: torch.Tensor, input_fq: "ActFakeQuant | None",
                    force: bool = False) -> torch.Tensor:
    """The bias as the int8 graph holds it: int32 with scale s_input·s_weight (onnxruntime adds it to
    the integer accumulator). Without this, the PyTorch model and the int8 file round differently."""
    if input_fq is None or not input_fq.ready or not (input_fq.enabled or force):
        return b
    s_x, _ = input_fq.qparams()
    scale = (w_scale.double() * s_x).float().double()
    q = torch.round(b.detach().double() / scale).clamp(-(2**31), 2**31 - 1)
    return b + ((q * scale).to(b.dtype) - b).detach()


class ActFakeQuant(nn.Module):
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
        return bool(self._tied[0].initialized) if self._tied else bool(self.initialized)

    def reset(self) -> None:
        self.initialized.fill_(False)

    def qparams(self) -> tuple[float, int]:
        if self._tied:
            return self._tied[0].qparams()
        lo, hi = min(float(self.min_val), 0.0), max(float(self.max_val), 0.0)
        scale = max((hi - lo) / (A_QMAX - A_QMIN), 1e-8)
        zp = int(min(max(round(A_QMIN - lo / scale), A_QMIN), A_QMAX))
        return scale, zp

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


class QConvBn2d(nn.Module):
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
            y = self._conv(x, q(self.conv.weight * factor.reshape(-1, 1, 1, 1)), None)
            y = y / factor.reshape(1, -1, 1, 1)
            if self.conv.bias is not None:
                y = y + self.conv.bias.reshape(1, -1, 1, 1)
            return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, bn.momentum or 0.1, bn.eps)
        w, b = self.folded()
        if self.quantize_weight:
            b = fake_quant_bias(b, weight_scale(w), self.input_fq)
        return self._conv(x, q(w), b)


class QLinear(nn.Module):
    """Linear layer with weights fake-quantized per output feature."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.quantize_weight = False
        self._input_fq: list = []

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


# -- graph rewriting ----------------------------------------------------------------------------

_FUSABLE_ACTS = (nn.ReLU, nn.ReLU6)
# modules whose output the int8 graph holds as a quantized tensor (max pooling included: its output is
# often read by a residual add as well as by a convolution)
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.SiLU, nn.GELU, nn.Tanh,
                nn.LeakyReLU, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d)
_COMPUTE_FUNCS = {operator.add, operator.mul, operator.iadd, operator.imul, torch.add, torch.mul, torch.cat, torch.mean, torch.sigmoid,
                  F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.adaptive_avg_pool2d,
                  F.avg_pool2d, F.max_pool2d, torch.flatten}
_COMPUTE_METHODS = {"add", "mul", "mean", "sigmoid", "relu", "add_", "mul_"}


def _tracer() -> fx.Tracer:
    leaf: set = set()
    wrap: set = set()
    try:  # timm marks modules and functions that symbolic tracing must not enter
        from timm.layers import _fx as timm_fx

        leaf = set(getattr(timm_fx, "_leaf_modules", set()))
        wrap = set(getattr(timm_fx, "_autowrap_functions", set()))
    except ImportError:
        pass
    try:
        from torchvision.models.shufflenetv2 import channel_shuffle

        wrap.add(channel_shuffle)
    except ImportError:
        pass

    class Tracer(fx.Tracer):
        def __init__(self):
            super().__init__(autowrap_functions=tuple(wrap))

        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return type(m) in leaf or isinstance(m, (ActFakeQuant, QConvBn2d, QLinear)) or super().is_leaf_module(m, name)

    return Tracer()


def _split_bn_act(model: nn.Module) -> nn.Module:
    """timm's BatchNormAct2d (BatchNorm + activation in one module) becomes Sequential(BatchNorm2d, act)
    so that the BatchNorm can be folded into the convolution before it."""
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:
        return model
    for name, child in list(model.named_children()):
        if isinstance(child, BatchNormAct2d):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            bn.load_state_dict(child.state_dict(), strict=False)
            parts = [bn] + [m for m in (child.drop, child.act) if not isinstance(m, nn.Identity)]
            setattr(model, name, nn.Sequential(*parts) if len(parts) > 1 else bn)
        else:
            _split_bn_act(child)
    return model


def _module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_fusable_act(gm: fx.GraphModule, node: fx.Node) -> bool:
    m = _module_of(gm, node)
    if m is not None:
        return isinstance(m, _FUSABLE_ACTS)
    return node.op == "call_function" and node.target in (F.relu, F.relu6, torch.relu)


_MOVE_FUNCS = {operator.getitem, torch.chunk, torch.split, torch.flatten, torch.reshape, torch.transpose,
               torch.permute}
_MOVE_METHODS = {"chunk", "split", "view", "reshape", "flatten", "transpose", "permute", "contiguous"}


def _moves_data(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that only move values (slices, reshapes, shuffles): their output stays on the input's grid."""
    if node.op == "call_function":
        return node.target in _MOVE_FUNCS or getattr(node.target, "__name__", "") == "channel_shuffle"
    if node.op == "call_method":
        return node.target in _MOVE_METHODS
    return isinstance(_module_of(gm, node), (nn.Identity, nn.Dropout, nn.Flatten))


def _quantized_source(gm: fx.GraphModule, node: fx.Node) -> ActFakeQuant | None:
    """The quantizer a value-moving chain ending at ``node`` starts from, if any."""
    while not isinstance(_module_of(gm, node), ActFakeQuant):
        if not _moves_data(gm, node) or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return _module_of(gm, node)


def _readers(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The nodes that read ``node``'s value, looking through modules that return their input unchanged
    in eval (Identity, Dropout)."""
    out = []
    for u in node.users:
        if isinstance(_module_of(gm, u), (nn.Identity, nn.Dropout)):
            out.extend(_readers(gm, u))
        else:
            out.append(u)
    return out


def _produces_quantized(gm: fx.GraphModule, node: fx.Node) -> bool:
    m = _module_of(gm, node)
    if m is not None:
        return isinstance(m, (QConvBn2d, QLinear, *_ACT_MODULES))
    if node.op == "call_function":
        return node.target in _COMPUTE_FUNCS or getattr(node.target, "__name__", "") == "channel_shuffle"
    if node.op == "call_method":
        return node.target in _COMPUTE_METHODS
    return node.op == "placeholder"


def prepare_qat(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """Rewrite a float model into its fake-quant form (observers on, fake quantization off until
    :func:`enable_fake_quant`). The input model is not modified."""
    model = _split_bn_act(copy.deepcopy(model)).eval()
    try:
        graph = _tracer().trace(model)
    except Exception as e:  # noqa: BLE001
        raise CompressError(f"QAT cannot trace {type(model).__name__}: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    gm = fx.GraphModule(model, graph)
    counter = [0]

    def new_name(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}_{counter[0]}"

    # 1. fold BatchNorm into the convolution before it; quantize linear layers
    for node in list(gm.graph.nodes):
        m = _module_of(gm, node)
        if isinstance(m, nn.Conv2d):
            users = list(node.users)
            bn_node = users[0] if len(users) == 1 else None
            bn = _module_of(gm, bn_node) if bn_node is not None else None
            if isinstance(bn, nn.BatchNorm2d):
                q = QConvBn2d(m, bn)
                bn_node.replace_all_uses_with(node)
                gm.graph.erase_node(bn_node)
            else:
                q = QConvBn2d(m, None)
            name = new_name("qconv")
            gm.add_submodule(name, q)
            node.target = name
        elif isinstance(m, nn.Linear):
            name = new_name("qlinear")
            gm.add_submodule(name, QLinear(m))
            node.target = name
    leftover = [n.target for n in gm.graph.nodes if isinstance(_module_of(gm, n), nn.modules.batchnorm._BatchNorm)]
    if leftover:
        raise CompressError(f"QAT: BatchNorm not after a convolution cannot be folded: {', '.join(map(str, leftover[:3]))}")

    # 2. activation fake-quant on every tensor the int8 graph holds
    quantized: dict[fx.Node, fx.Node] = {}

    def insert_after(node: fx.Node) -> fx.Node:
        if node in quantized:
            return quantized[node]
        name = new_name("act_fq")
        fq_module = ActFakeQuant()
        source = _quantized_source(gm, node) if _moves_data(gm, node) else None
        if source is not None:
            fq_module.tie(source)
        gm.add_submodule(name, fq_module)
        with gm.graph.inserting_after(node):
            fq = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(fq, delete_user_cb=lambda u: u is not fq)
        quantized[node] = fq
        quantized[fq] = fq
        return fq

    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    logits_node = output_node.args[0] if isinstance(output_node.args[0], fx.Node) else None
    for node in list(gm.graph.nodes):
        if node in quantized or node.op in ("output", "get_attr") or node is logits_node:
            continue
        if not _produces_quantized(gm, node):
            continue
        users = _readers(gm, node)
        if users and all(_is_fusable_act(gm, u) for u in users) and node.op != "placeholder":
            continue  # quantized after the ReLU, which onnxruntime folds into the requantization
        insert_after(node)
    # every convolution and linear layer reads a quantized tensor
    def no_op_source(n: fx.Node) -> fx.Node:
        """Look through modules that return their input unchanged in eval (Identity, Dropout)."""
        while isinstance(_module_of(gm, n), (nn.Identity, nn.Dropout)) and isinstance(n.args[0], fx.Node):
            n = n.args[0]
        return n

    for node in list(gm.graph.nodes):
        if isinstance(_module_of(gm, node), (QConvBn2d, QLinear)):
            src = node.args[0]
            if isinstance(src, fx.Node) and no_op_source(src) not in quantized.values():
                name = new_name("act_fq")
                fq_module = ActFakeQuant()
                source = _quantized_source(gm, src)
                if source is not None:
                    fq_module.tie(source)
                gm.add_submodule(name, fq_module)
                with gm.graph.inserting_before(node):
                    fq = gm.graph.call_module(name, (src,))
                node.replace_input_with(src, fq)
                quantized[fq] = fq
    for node in gm.graph.nodes:  # each quantized layer knows the quantizer of its input (bias scale)
        layer = _module_of(gm, node)
        if isinstance(layer, (QConvBn2d, QLinear)) and isinstance(node.args[0], fx.Node):
            src = no_op_source(node.args[0])
            fq = _module_of(gm, src)
            if isinstance(fq, ActFakeQuant):
                layer._input_fq[:] = [fq]
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.eval()
    set_observers(gm, False)
    with torch.no_grad():
        gm(example_input)  # checks the rewritten graph runs; eval mode leaves BatchNorm statistics alone
    set_observers(gm, True)
    return gm


def _modules(gm: nn.Module, kind):
    return [m for m in gm.modules() if isinstance(m, kind)]


def enable_fake_quant(gm: nn.Module, enabled: bool = True) -> None:
    for m in _modules(gm, ActFakeQuant):
        m.enabled = enabled
    for m in _modules(gm, (QConvBn2d, QLinear)):
        m.quantize_weight = enabled


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


def to_export(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy for ONNX export: BN folded into frozen convolutions, observers off, fake quant on."""
    out = copy.deepcopy(gm).eval()
    for name, m in list(out.named_modules()):
        if isinstance(m, QConvBn2d):
            _set_module(out, name, FrozenQConv2d(m))
        elif isinstance(m, QLinear):
            _set_module(out, name, FrozenQLinear(m))
        elif isinstance(m, ActFakeQuant):
            m.observe, m.enabled = False, True
    out.recompile()
    return out


def _set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, new)


def qat_summary(gm: nn.Module) -> dict:
    convs = _modules(gm, QConvBn2d)
    return {"convolutions": len(convs), "batchnorms_folded": sum(c.bn is not None for c in convs),
            "linear_layers": len(_modules(gm, QLinear)), "activation_quantizers": len(_modules(gm, ActFakeQuant))}


def quantized_model(model: nn.Module, image_size: int) -> fx.GraphModule:
    """The fake-quant form of ``model`` in its final, inference state (observers and BN frozen)."""
    gm = prepare_qat(model, torch.zeros(1, 3, image_size, image_size))
    set_observers(gm, False)
    freeze_bn(gm, True)
    enable_fake_quant(gm, True)
    return gm.eval()


def load_qat_checkpoint(path: Path) -> tuple[fx.GraphModule, dict]:
    """Rebuild a QAT model saved by the quantize stage (its JSON names the float architecture)."""
    import json

    from compress.models import create_model, load_state_dict_file

    meta_path = Path(path).with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        model = create_model(meta["model"], int(meta["num_classes"]))
        if meta.get("arch"):
            from compress.prune import apply_architecture

            apply_architecture(model, meta["arch"])
        gm = quantized_model(model, int(meta["image_size"]))
    except (OSError, ValueError, KeyError, TypeError):
        raise CompressError(f"QAT checkpoint metadata {meta_path} is missing or corrupt") from None
    try:
        gm.load_state_dict(load_state_dict_file(path))
    except RuntimeError:
        raise CompressError(f"checkpoint {path} does not fit the QAT form of {meta['model']}") from None
    return gm.eval(), meta


def qat_schedule(gm: nn.Module, epoch: int, freeze_observers_after: int, freeze_bn_after: int) -> None:
    """State of the QAT switches at the start of ``epoch`` (0-based), a pure function of the epoch so a
    resumed run sees exactly what an uninterrupted one saw."""
    enable_fake_quant(gm, True)
    set_observers(gm, epoch < freeze_observers_after)
    freeze_bn(gm, epoch >= freeze_bn_after)


def export_qdq(gm: fx.GraphModule, path: Path, image_size: int, opset: int = 18, metadata: dict | None = None) -> dict:
    """Write the int8 QDQ ONNX file of a fake-quant model; returns what was stored as integers."""
    import tempfile

    from compress.export import export_onnx, update_metadata
    from compress.int8 import finalize_qdq

    with tempfile.TemporaryDirectory() as tmp:
        raw = export_onnx(to_export(gm), Path(tmp) / "qdq.onnx", image_size, opset=opset, exporters=("torchscript",))
        info = finalize_qdq(raw, path)
    if metadata:
        update_metadata(path, metadata)
    return info


SCHEME = {
    "format": "ONNX QDQ",
    "weights": "int8, symmetric, per output channel (zero point 0, scale max|w|/127)",
    "activations": "uint8, asymmetric, per tensor",
    "batchnorm": "folded into the preceding convolution",
    "bias": "int32, scale input_scale*weight_scale",
}
