"""INT8 ONNX: finishing the QDQ file exported from a fake-quant model, onnxruntime's static
quantization as the PTQ baseline, and a report of which kernels onnxruntime actually runs."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress.errors import CompressError
from compress.export import ort_session
from compress.fsio import atomic_path

FLOAT_CONV_OPS = {"Conv", "FusedConv", "ConvTranspose"}
QUANT_CONV_OPS = {"QLinearConv", "ConvInteger", "NhwcQLinearConv"}


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    for node in graph.node:  # the exporter routes shared initializers through Identity
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def finalize_qdq(src: Path, dst: Path) -> dict:
    """Store constant weights as int8 (QuantizeLinear of a constant is computed once, here) and biases
    of quantized Conv/Gemm as int32 with scale s_input·s_weight, the layout onnxruntime's own QDQ
    quantizer writes and fuses into QLinearConv/QGemm."""
    proto = onnx.load(str(src))
    graph = proto.graph
    consts = _constants(graph)
    producers = {o: n for n in graph.node for o in n.output}
    new_inits: list[onnx.TensorProto] = []
    drop: set[int] = set()
    renames: dict[str, str] = {}
    weight_zp_free: set[str] = set()  # symmetric weights: the zero point input is dropped (default 0)
    folded = 0
    for i, node in enumerate(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in consts:
            continue
        x = consts[node.input[0]].astype(np.float64)
        scale = consts[node.input[1]].astype(np.float64)
        zp = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros_like(scale, np.uint8)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zpb = scale.reshape(shape), zp.reshape(shape).astype(np.float64)
        else:
            zpb = zp.astype(np.float64)
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(x / scale) + zpb, info.min, info.max).astype(zp.dtype)
        name = f"{node.input[0]}_quantized"
        new_inits.append(numpy_helper.from_array(q, name))
        renames[node.output[0]] = name
        if not np.any(zp):
            weight_zp_free.add(node.output[0])
        drop.add(i)
        folded += 1
    # onnxruntime fuses QLinearConv without weight zero points but wants them for QGemm
    gemm_inputs = {i for n in graph.node if n.op_type == "Gemm" for i in n.input}
    for node in graph.node:
        if (node.op_type == "DequantizeLinear" and node.input[0] in weight_zp_free and len(node.input) > 2
                and node.output[0] not in gemm_inputs):
            del node.input[2]
        for j, inp in enumerate(node.input):
            if inp in renames:
                node.input[j] = renames[inp]
    kept = [n for i, n in enumerate(graph.node) if i not in drop]
    graph.ClearField("node")
    graph.node.extend(kept)
    graph.initializer.extend(new_inits)
    consts.update({t.name: numpy_helper.to_array(t) for t in new_inits})
    producers = {o: n for n in graph.node for o in n.output}

    bias_nodes: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []
    biases = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in consts:
            continue
        dq_x, dq_w = producers.get(node.input[0]), producers.get(node.input[1])
        if not (dq_x is not None and dq_w is not None and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        s_x = consts.get(dq_x.input[1])
        s_w = consts.get(dq_w.input[1])
        bias = consts[node.input[2]]
        if s_x is None or s_w is None or bias.dtype != np.float32:
            continue
        scale = (np.float64(s_x) * s_w.astype(np.float64)).astype(np.float32).reshape(-1)
        if scale.size == 1:
            scale = np.full(bias.shape, scale[0], np.float32)
        q = np.clip(np.rint(bias.astype(np.float64) / scale), -(2**31), 2**31 - 1).astype(np.int32)
        base = f"{node.input[2]}_{node.name or node.output[0]}"
        new = [numpy_helper.from_array(q, f"{base}_int32"), numpy_helper.from_array(scale, f"{base}_scale")]
        if node.op_type == "Gemm":
            new.append(numpy_helper.from_array(np.zeros_like(q), f"{base}_zp"))
        graph.initializer.extend(new)
        dq = helper.make_node("DequantizeLinear", [t.name for t in new], [f"{base}_dq"], name=f"{base}_DequantizeLinear", axis=0)
        bias_nodes.append((node, dq))
        node.input[2] = dq.output[0]
        biases += 1
    for node, dq in bias_nodes:
        idx = list(graph.node).index(node)
        graph.node.insert(idx, dq)
    _shape_from_quantized(graph)
    _drop_dead_nodes(graph)
    _drop_unused_initializers(graph)
    _compact_names(graph)
    onnx.checker.check_model(proto)
    with atomic_path(dst) as tmp:
        onnx.save(proto, str(tmp))
    return {"weights_stored_int8": folded, "biases_stored_int32": biases}


def _shape_from_quantized(graph: onnx.GraphProto) -> None:
    """A Shape node reading a DequantizeLinear output reads its int8 input instead (same shape), so the
    dequantization is not kept alive just to be measured and onnxruntime can fuse it away."""
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type == "Shape":
            src = producers.get(node.input[0])
            if src is not None and src.op_type == "DequantizeLinear":
                node.input[0] = src.input[0]


def _compact_names(graph: onnx.GraphProto) -> None:
    """Short tensor names and no node names: the exporter's scope paths take a tenth of a small int8
    file. The graph's input and output names stay."""
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            names[name] = f"t{len(names)}"
        return names[name]

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.name = ""
        for i, n in enumerate(node.input):
            node.input[i] = short(n)
        for i, n in enumerate(node.output):
            node.output[i] = short(n)
    for vi in graph.value_info:
        vi.name = short(vi.name)


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is read (left over once their consumers were rewired)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        alive = [n for n in graph.node if any(o in used for o in n.output)]
        if len(alive) == len(graph.node):
            return
        graph.ClearField("node")
        graph.node.extend(alive)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(keep)


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


def ptq_static(fp32: Path, dst: Path, calibration: np.ndarray, batch_size: int = 32) -> None:
    """onnxruntime's ``quantize_static``: QDQ, per-channel int8 weights, uint8 activations,
    min/max calibration on ``calibration`` (N, C, H, W)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, name: str):
            self.batches = iter([{name: calibration[i : i + batch_size]} for i in range(0, len(calibration), batch_size)])

        def get_next(self):
            return next(self.batches, None)

    input_name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        except Exception:  # noqa: BLE001 - pre-processing is an optimization; quantize the file as it is
            pre = fp32
        out = Path(tmp) / "ptq.onnx"
        try:
            quantize_static(str(pre), str(out), Reader(input_name), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        except Exception as e:  # noqa: BLE001
            raise CompressError(f"onnxruntime static quantization failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
        with atomic_path(dst) as final:
            final.write_bytes(out.read_bytes())
