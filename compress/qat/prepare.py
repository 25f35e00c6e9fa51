"""The FX rewrite that turns a float model into its fake-quant form (:func:`prepare_qat`).

The placement of activation fake-quant mirrors what onnxruntime fuses: every convolution and linear
layer reads a quantized tensor and writes one; a ReLU/ReLU6 that is the only reader of a convolution or
an add is quantized after the activation (onnxruntime folds it into the requantization); adds,
multiplies, concatenations, poolings, channel shuffles and other activations write quantized tensors
too. Reshapes, transposes, slices and flattens are left alone: they move int8 data as it is, and share
the quantization parameters of their input.

Before placement, operations that onnxruntime would run in float between int8 kernels are rewritten
into forms it runs in int8 (:meth:`_Rewrite.int8_forms`): hard-sigmoid into :class:`QHardsigmoid`,
hard-swish into x · QHardsigmoid(x), and a mean over height and width into global average pooling."""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from compress.errors import CompressError, short
from compress.qat.fakequant import ActFakeQuant, host_weight_bits, weight_levels
from compress.qat.modules import QAddMul, QConvBn2d, QGlobalAvgPool, QHardsigmoid, QLinear
from compress.qat.schedule import set_observers

_FUSABLE_ACTS = (nn.ReLU, nn.ReLU6)
# modules whose output the int8 graph holds as a quantized tensor (max pooling included: its output is
# often read by a residual add as well as by a convolution)
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.SiLU, nn.GELU, nn.Tanh,
                nn.LeakyReLU, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d)
_ELEMENTWISE_ACTS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.SiLU, nn.GELU, nn.Tanh, nn.LeakyReLU)
_COMPUTE_FUNCS = {operator.add, operator.mul, operator.iadd, operator.imul, torch.add, torch.mul, torch.cat, torch.mean, torch.sigmoid,
                  F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.adaptive_avg_pool2d,
                  F.avg_pool2d, F.max_pool2d, torch.flatten}
_COMPUTE_METHODS = {"add", "mul", "mean", "sigmoid", "relu", "add_", "mul_"}


def _tracer() -> fx.Tracer:
    leaf: set = set()
    wrap: set = set()
    try:  # timm marks modules and functions that symbolic tracing must not enter
        from timm.layers import get_notrace_functions, get_notrace_modules

        leaf = set(get_notrace_modules())
        wrap = set(get_notrace_functions())
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
            # linear layers are leaves whatever their class (timm's Linear calls F.linear), so that
            # they are found and quantized like torch's own
            return (type(m) in leaf or isinstance(m, (ActFakeQuant, QConvBn2d, QLinear, QHardsigmoid, QAddMul, nn.Linear))
                    or super().is_leaf_module(m, name))

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


def _hard_kinds() -> tuple[tuple, tuple]:
    """Module classes of hard-sigmoid and hard-swish (torch's, and timm's own where it has them)."""
    sig, swish = [nn.Hardsigmoid], [nn.Hardswish]
    try:
        from timm.layers import activations as ta

        sig += [c for c in (getattr(ta, "HardSigmoid", None),) if c]
        swish += [c for c in (getattr(ta, "HardSwish", None),) if c]
    except ImportError:
        pass
    return tuple(sig), tuple(swish)


def _hard_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """"sigmoid" or "swish" for a hard-sigmoid or hard-swish node, else None."""
    m = _module_of(gm, node)
    sig, swish = _hard_kinds()
    if m is not None:
        return "sigmoid" if isinstance(m, sig) else "swish" if isinstance(m, swish) else None
    if node.op == "call_function":
        return {F.hardsigmoid: "sigmoid", F.hardswish: "swish"}.get(node.target)
    if node.op == "call_method":
        return {"hardsigmoid": "sigmoid", "hardswish": "swish"}.get(node.target)
    return None


def _spatial_mean(node: fx.Node) -> bool | None:
    """For a mean over the last two axes of a 4-d tensor: whether it keeps them; otherwise None."""
    if not ((node.op == "call_method" and node.target == "mean") or (node.op == "call_function" and node.target is torch.mean)):
        return None
    meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    if meta is None or len(meta.shape) != 4:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = {d % 4 for d in dim} if isinstance(dim, (tuple, list)) else None
    if dims != {2, 3} or node.kwargs.get("dtype") is not None:
        return None
    return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))


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
    """Ops whose every output value is one of their input values (slices, reshapes, shuffles, max
    pooling): their output stays on the input's grid. onnxruntime runs a max pooling on uint8 data only
    when the quantization parameters before and after it are the same; with others it dequantizes,
    pools in float and quantizes again."""
    if node.op == "call_function":
        return (node.target in _MOVE_FUNCS or node.target is F.max_pool2d
                or getattr(node.target, "__name__", "") == "channel_shuffle")
    if node.op == "call_method":
        return node.target in _MOVE_METHODS
    return isinstance(_module_of(gm, node), (nn.Identity, nn.Dropout, nn.Flatten, nn.MaxPool2d))


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


def _no_op_source(gm: fx.GraphModule, n: fx.Node) -> fx.Node:
    """Look through modules that return their input unchanged in eval (Identity, Dropout)."""
    while isinstance(_module_of(gm, n), (nn.Identity, nn.Dropout)) and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


class _Rewrite:
    """The steps of :func:`prepare_qat` on one traced graph; new submodules are numbered in the order
    they are made (the names are the checkpoint's keys)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.count = 0
        self.quantized: dict[fx.Node, fx.Node] = {}  # node -> its fake-quant node (and each to itself)
        self.float_nodes: set[fx.Node] = set()  # the float stem: input, first convolution, its activation
        self.float_output: fx.Node | None = None  # the stem's last node: quantized after it

    def add(self, prefix: str, module: nn.Module) -> str:
        self.count += 1
        name = f"{prefix}_{self.count}"
        self.gm.add_submodule(name, module)
        return name

    def fold_layers(self) -> None:
        """BatchNorm folded into the convolution before it; linear layers quantized."""
        gm = self.gm
        for node in list(gm.graph.nodes):
            m = _module_of(gm, node)
            if isinstance(m, nn.Conv2d):
                users = list(node.users)
                bn_node = users[0] if len(users) == 1 else None
                bn = _module_of(gm, bn_node) if bn_node is not None else None
                if isinstance(bn, nn.BatchNorm2d):
                    q = QConvBn2d.from_float(m, bn)
                    bn_node.replace_all_uses_with(node)
                    gm.graph.erase_node(bn_node)
                else:
                    q = QConvBn2d.from_float(m)
                node.target = self.add("qconv", q)
            elif isinstance(m, nn.Linear):
                node.target = self.add("qlinear", QLinear.from_float(m))
        leftover = [n.target for n in gm.graph.nodes if isinstance(_module_of(gm, n), nn.modules.batchnorm._BatchNorm)]
        if leftover:
            raise CompressError(f"QAT: BatchNorm not after a convolution cannot be folded: {', '.join(map(str, leftover[:3]))}")

    def float_stem(self) -> None:
        """The first convolution, when it alone reads the input image and its activation is one that
        onnxruntime cannot fold into an int8 convolution (hard-swish, SiLU, GELU...), stays float with
        that activation; quantization starts after them. Measured at 224x224, 1 thread: the int8 stem
        of MobileNetV3 (a 3-channel convolution, then hard-swish as QLinearAdd + QLinearMul over the
        largest tensor) took 2-3x the float one's time (INT8/FP32 of mobilenetv3_small_050 1.43 with it,
        1.13 without); a stem with a ReLU, which the int8 convolution folds, is faster in int8
        (resnet18 0.30 against 0.45 with a float stem, shufflenet_v2_x0_5 0.95 against 1.48)."""
        gm = self.gm
        image = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
        readers = _readers(gm, image) if image is not None else []
        conv = _module_of(gm, readers[0]) if len(readers) == 1 else None
        after = _readers(gm, readers[0]) if isinstance(conv, QConvBn2d) else []
        if len(after) != 1 or _is_fusable_act(gm, after[0]) or not (
                _hard_kind(gm, after[0]) or isinstance(_module_of(gm, after[0]), _ELEMENTWISE_ACTS)
                or (after[0].op == "call_function" and after[0].target in (F.silu, F.gelu, torch.sigmoid))):
            return
        conv.keep_float = True
        self.float_nodes.update({image, readers[0], after[0]})
        self.float_output = after[0]

    def int8_forms(self, example_input: torch.Tensor) -> None:
        """Rewrite what onnxruntime would run in float between int8 kernels into what it runs in int8:
        hard-sigmoid → :class:`QHardsigmoid` (a QLinearAdd), hard-swish → x · QHardsigmoid(x) (and a
        QLinearMul), a mean over height and width → global average pooling (QLinearGlobalAveragePool
        rather than a float ReduceMean)."""
        gm = self.gm
        gm.recompile()
        gm.eval()  # shapes only: BatchNorm statistics stay as they are
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
        for node in list(gm.graph.nodes):
            if node in self.float_nodes:
                continue
            kind = _hard_kind(gm, node)
            keep = _spatial_mean(node)
            if kind is not None:
                x = node.args[0] if node.args else node.kwargs["input"]
                with gm.graph.inserting_after(node):
                    gate = gm.graph.call_module(self.add("hardsigmoid", QHardsigmoid()), (x,))
                self.quantized[gate] = gate  # its output is already on a uint8 grid
                new = gate
                if kind == "swish":
                    with gm.graph.inserting_after(gate):
                        new = gm.graph.call_function(operator.mul, (x, gate))
            elif keep is not None:
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_function(F.adaptive_avg_pool2d, (node.args[0], 1))
                if not keep:
                    with gm.graph.inserting_after(new):
                        new = gm.graph.call_function(torch.flatten, (new, 1))
            else:
                continue
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)

    def _quantizer(self, source: fx.Node) -> str:
        """A new activation quantizer; a value-moving chain from a quantized tensor shares its grid."""
        fq_module = ActFakeQuant()
        tied = _quantized_source(self.gm, source)
        if tied is not None:
            fq_module.tie(tied)
        return self.add("act_fq", fq_module)

    def quantize_outputs(self) -> None:
        """Activation fake-quant after every tensor the int8 graph holds."""
        gm = self.gm
        output_node = next(n for n in gm.graph.nodes if n.op == "output")
        logits_node = output_node.args[0] if isinstance(output_node.args[0], fx.Node) else None
        for node in list(gm.graph.nodes):
            if node in self.quantized or node.op in ("output", "get_attr") or node is logits_node:
                continue
            if node in self.float_nodes and node is not self.float_output:
                continue
            if not _produces_quantized(gm, node):
                continue
            users = _readers(gm, node)
            if (users and all(_is_fusable_act(gm, u) for u in users) and node.op != "placeholder"
                    and node not in self.float_nodes):
                continue  # quantized after the ReLU, which onnxruntime folds into the requantization
            name = self._quantizer(node) if _moves_data(gm, node) else self.add("act_fq", ActFakeQuant())
            with gm.graph.inserting_after(node):
                fq = gm.graph.call_module(name, (node,))
            node.replace_all_uses_with(fq, delete_user_cb=lambda u, fq=fq: u is not fq)
            self.quantized[node] = fq
            self.quantized[fq] = fq

    def quantize_layer_inputs(self) -> None:
        """Every convolution and linear layer reads a quantized tensor."""
        gm = self.gm
        for node in list(gm.graph.nodes):
            if isinstance(_module_of(gm, node), (QConvBn2d, QLinear)) and node not in self.float_nodes:
                src = node.args[0]
                if isinstance(src, fx.Node) and _no_op_source(gm, src) not in self.quantized.values():
                    name = self._quantizer(src)
                    with gm.graph.inserting_before(node):
                        fq = gm.graph.call_module(name, (src,))
                    node.replace_input_with(src, fq)
                    self.quantized[fq] = fq

    def link_input_quantizers(self) -> None:
        """Each quantized layer knows the quantizer of its input (its bias scale is s_input·s_weight),
        and a convolution the quantizer of its output where one reads it alone (directly or after a
        ReLU that onnxruntime folds into the requantization): with both it computes what QLinearConv
        computes."""
        gm = self.gm
        for node in gm.graph.nodes:
            layer = _module_of(gm, node)
            if isinstance(layer, (QConvBn2d, QLinear)) and isinstance(node.args[0], fx.Node):
                fq = _module_of(gm, _no_op_source(gm, node.args[0]))
                if isinstance(fq, (ActFakeQuant, QHardsigmoid)):
                    layer._input_fq[:] = [fq]
            if isinstance(layer, QConvBn2d):
                users = _readers(gm, node)
                if len(users) == 1 and _is_fusable_act(gm, users[0]):
                    users = _readers(gm, users[0])
                out_fq = _module_of(gm, users[0]) if len(users) == 1 else None
                if isinstance(out_fq, ActFakeQuant) and not out_fq._tied:
                    layer._output_fq[:] = [out_fq]
            elif isinstance(layer, QHardsigmoid) and isinstance(node.args[0], fx.Node):
                fq = _module_of(gm, _no_op_source(gm, node.args[0]))
                if isinstance(fq, ActFakeQuant):
                    layer._input_fq[:] = [fq]

    def exact_binaries(self) -> None:
        """An add or multiply of two quantized tensors whose result is quantized becomes a
        :class:`QAddMul` that knows the three quantizers (and computes what QLinearAdd/QLinearMul do)."""
        gm = self.gm
        kinds = {operator.add: "add", operator.iadd: "add", torch.add: "add", operator.mul: "mul",
                 operator.imul: "mul", torch.mul: "mul"}
        for node in list(gm.graph.nodes):
            if node.op == "call_function":
                op = kinds.get(node.target)
            elif node.op == "call_method":
                op = {"add": "add", "add_": "add", "mul": "mul", "mul_": "mul"}.get(node.target)
            else:
                op = None
            if op is None or node.kwargs or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
                continue
            ins = [_module_of(gm, _no_op_source(gm, a)) for a in node.args]
            users = _readers(gm, node)
            if len(users) == 1 and _is_fusable_act(gm, users[0]):  # onnxruntime folds it into the saturation
                users = _readers(gm, users[0])
            out = _module_of(gm, users[0]) if len(users) == 1 else None
            if not all(isinstance(m, (ActFakeQuant, QHardsigmoid)) for m in ins) or not isinstance(out, ActFakeQuant) or out._tied:
                continue
            module = QAddMul(op)
            module._fqs[:] = [*ins, out]
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(self.add(f"q{op}", module), tuple(node.args))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)


    def exact_pools(self) -> None:
        """A global average pooling of a quantized tensor whose result is quantized becomes a
        :class:`QGlobalAvgPool` that knows both quantizers (and computes what QLinearGlobalAveragePool
        does)."""
        gm = self.gm
        for node in list(gm.graph.nodes):
            m = _module_of(gm, node)
            if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
                size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            elif isinstance(m, nn.AdaptiveAvgPool2d):
                size = m.output_size
            else:
                continue
            if size not in (1, (1, 1), [1, 1]) or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            src = _module_of(gm, _no_op_source(gm, node.args[0]))
            users = list(node.users)
            out = _module_of(gm, users[0]) if len(users) == 1 else None
            if not isinstance(src, ActFakeQuant) or not isinstance(out, ActFakeQuant) or out._tied:
                continue
            module = QGlobalAvgPool()
            module._fqs[:] = [src, out]
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(self.add("qpool", module), (node.args[0],))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)


def prepare_qat(model: nn.Module, example_input: torch.Tensor, float_stem: bool = True,
                weight_bits: int | None = None) -> fx.GraphModule:
    """Rewrite a float model into its fake-quant form (observers on, fake quantization off until
    ``enable_fake_quant``). The input model is not modified. With ``float_stem`` the first convolution
    and its activation stay float (:meth:`_Rewrite.float_stem`). ``weight_bits``: 8 or 7 (weights in
    ±127 or ±63); default: what onnxruntime computes exactly on this machine (:func:`host_weight_bits`)."""
    model = _split_bn_act(copy.deepcopy(model)).eval()
    try:
        graph = _tracer().trace(model)
    except Exception as e:  # noqa: BLE001
        raise CompressError(f"QAT cannot trace {type(model).__name__}: {short(e)}") from None
    gm = fx.GraphModule(model, graph)
    rewrite = _Rewrite(gm)
    rewrite.fold_layers()
    if float_stem:
        rewrite.float_stem()
    rewrite.int8_forms(example_input)
    rewrite.quantize_outputs()
    rewrite.quantize_layer_inputs()
    rewrite.link_input_quantizers()
    rewrite.exact_binaries()
    rewrite.exact_pools()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.eval()
    levels = weight_levels(weight_bits or host_weight_bits())
    for m in gm.modules():
        if isinstance(m, (QConvBn2d, QLinear)):
            m.w_levels.fill_(levels)
    set_observers(gm, False)
    with torch.no_grad():
        gm(example_input)  # checks the rewritten graph runs; eval mode leaves BatchNorm statistics alone
    set_observers(gm, True)
    return gm
