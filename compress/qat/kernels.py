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


def optimized_ops(path: Path, threads: int = 1) -> Counter:
    """Operator counts of the graph onnxruntime actually runs (``optimized_model_filepath``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        ort_session(path, threads=threads, optimized_path=out)
        proto = onnx.load(str(out))
    return Counter(n.op_type for n in proto.graph.node)


def kernel_report(path: Path) -> dict:
    ops = optimized_ops(path)
    return {
        "quantized_convolutions": sum(ops[o] for o in QUANT_CONV_OPS),
        "float_convolutions": sum(ops[o] for o in FLOAT_CONV_OPS),
        "ops": dict(sorted(ops.items())),
    }
