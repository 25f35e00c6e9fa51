"""Which kernels onnxruntime actually runs for an ONNX file: operator counts of its optimized graph,
and whether every convolution became an int8 kernel."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx

from compress.evaluate import ort_session

FLOAT_CONV_OPS = {"Conv", "FusedConv", "ConvTranspose"}
QUANT_CONV_OPS = {"QLinearConv", "ConvInteger", "NhwcQLinearConv"}


# operations that run on whatever element type they read: int8 work when they read uint8 data, float
# work when they read a dequantized tensor (onnxruntime leaves DequantizeLinear → MaxPool → QuantizeLinear
# in float when the two quantizations differ, and may wrap that float pooling in NCHWc reorders)
TYPE_AGNOSTIC_OPS = {"MaxPool", "NhwcMaxPool", "Transpose", "Flatten", "Reshape", "Split", "Slice", "Gather",
                     "Squeeze", "Unsqueeze", "Identity"}
# what onnxruntime may run between int8 kernels besides them: the layout changes into the NHWC int8
# convolutions and back, and operations that move uint8 data as it is
INT8_OPS = {"QLinearConv", "NhwcQLinearConv", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
            "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QGemm",
            "QuantizeLinear", "DequantizeLinear"} | TYPE_AGNOSTIC_OPS


def _optimized_graph(path: Path, threads: int = 1) -> onnx.GraphProto:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        ort_session(path, threads=threads, optimized_path=out)
        return onnx.load(str(out)).graph


def optimized_ops(path: Path, threads: int = 1, shape_arithmetic: bool = True) -> Counter:
    """Operator counts of the graph onnxruntime actually runs (``optimized_model_filepath``); with
    ``shape_arithmetic=False``, without the nodes that only compute tensor shapes (a Shape node and what
    reads nothing but shapes and constants: a reshape whose target depends on the dynamic batch size)."""
    graph = _optimized_graph(path, threads)
    nodes = list(graph.node)
    if not shape_arithmetic:
        shape_only = _shape_only(graph)
        nodes = [n for n in nodes if not shape_only(n)]
    return Counter(n.op_type for n in nodes)


def float_ops_between_int8(path: Path, threads: int = 1) -> Counter:
    """Operations onnxruntime runs in float after the input's first quantization (shape arithmetic
    aside): none in a fully int8 file. What runs before it (a float stem) is not counted; a pooling,
    reshape or slice counts as float when it reads a dequantized tensor."""
    graph = _optimized_graph(path, threads)
    shape_only = _shape_only(graph)
    before = {i.name for i in graph.input}  # tensors computed before any quantization
    constants = {i.name for i in graph.initializer}
    floats: set[str] = set()  # float tensors after the first quantization
    out: Counter = Counter()
    for n in graph.node:  # topological order
        if shape_only(n):
            continue
        data_inputs = [i for i in n.input if i]
        if n.op_type != "QuantizeLinear" and data_inputs and all(i in before or i in constants for i in data_inputs):
            before.update(n.output)
        elif n.op_type == "DequantizeLinear" or (n.op_type in TYPE_AGNOSTIC_OPS and data_inputs[0] in floats):
            floats.update(n.output)
            if n.op_type != "DequantizeLinear":
                out[n.op_type] += 1
        elif n.op_type not in INT8_OPS:
            floats.update(n.output)
            out[n.op_type] += 1
    return out



def _shape_only(graph: onnx.GraphProto):
    constants = {i.name for i in graph.initializer} | {""}
    shapes: set[str] = set()
    for n in graph.node:  # topological order
        if n.op_type == "Shape" or (n.op_type != "Constant" and all(i in constants or i in shapes for i in n.input)
                                    and any(i in shapes for i in n.input)):
            shapes.update(n.output)
        elif n.op_type == "Constant" or not n.input:
            constants.update(n.output)
    return lambda n: n.op_type == "Shape" or (bool(n.output) and n.output[0] in shapes) or n.op_type == "Constant"


def kernel_report(path: Path) -> dict:
    ops = optimized_ops(path)
    return {
        "quantized_convolutions": sum(ops[o] for o in QUANT_CONV_OPS),
        "float_convolutions": sum(ops[o] for o in FLOAT_CONV_OPS),
        "float_ops_between_int8": dict(sorted(float_ops_between_int8(path).items())),
        "ops": dict(sorted(ops.items())),
    }
