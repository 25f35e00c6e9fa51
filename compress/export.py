"""ONNX export with a dynamic batch axis, ``onnx.checker``, parity against PyTorch and deployer metadata."""

from __future__ import annotations

import io
import json
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.utils.data import Dataset

from compress.errors import CheckFailed, CompressError
from compress.fsio import atomic_path
from compress.train import loader, predict

INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(model: nn.Module, path: Path, image_size: int, opset: int = 18, in_chans: int = 3,
                metadata: dict | None = None, exporters: tuple[str, ...] = ("torchscript", "dynamo")) -> Path:
    """Export ``model`` (eval mode, CPU) to ``path`` with input ``(batch, C, S, S)``.

    The TorchScript exporter is tried first (fast, exact for every registry model); the dynamo
    exporter is the fallback for graphs it cannot express (VGG's adaptive pooling at small sizes)."""
    model = model.eval().cpu()
    x = torch.zeros(2, in_chans, image_size, image_size)
    with atomic_path(path) as tmp:
        errors = []
        for dynamo in (e == "dynamo" for e in exporters):
            try:
                _export(model, x, tmp, opset, dynamo)
                break
            except Exception as e:  # noqa: BLE001 - the second exporter gets its chance
                errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        else:
            raise CompressError(f"ONNX export of {type(model).__name__} failed ({'; '.join(errors)})")
        proto = onnx.load(str(tmp))
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as e:
            raise CompressError(f"exported ONNX does not pass onnx.checker: {str(e).splitlines()[0]}") from None
        if metadata:
            set_metadata(proto, metadata)
        onnx.save(proto, str(tmp))
    return path


def _export(model: nn.Module, x: torch.Tensor, path: Path, opset: int, dynamo: bool) -> None:
    kw: dict = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset, "dynamo": dynamo}
    if dynamo:
        kw["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=65536)},)
        kw["external_data"] = False
    else:
        kw["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    sink = io.StringIO()
    with warnings.catch_warnings(), redirect_stdout(sink), redirect_stderr(sink):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **kw)


def set_metadata(proto: onnx.ModelProto, metadata: dict) -> None:
    """``metadata_props`` as strings; lists and dicts as JSON."""
    existing = {p.key: p for p in proto.metadata_props}
    for k, v in metadata.items():
        text = v if isinstance(v, str) else json.dumps(v)
        if k in existing:
            existing[k].value = text
        else:
            proto.metadata_props.add(key=k, value=text)


def update_metadata(path: Path, metadata: dict) -> None:
    """Set ``metadata_props`` of an ONNX file in place (atomically)."""
    proto = onnx.load(str(path))
    set_metadata(proto, metadata)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


def read_metadata(path: Path) -> dict[str, str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def ort_session(path: Path, threads: int = 0, optimized_path: Path | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise CompressError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0][:200]}") from None


def ort_predict(session, ds: Dataset, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    name = session.get_inputs()[0].name
    outs, ys = [], []
    for x, y in loader(ds, batch_size):
        outs.append(session.run(None, {name: x.numpy()})[0])
        ys.append(y.numpy())
    return np.concatenate(outs), np.concatenate(ys)


def parity(model: nn.Module, onnx_path: Path, ds: Dataset, max_abs_diff: float, min_agreement: float) -> dict:
    """Compare ONNX (onnxruntime) and PyTorch logits on the whole split; fail past the tolerances."""
    ref, targets = predict(model.eval().cpu(), ds)
    got, _ = ort_predict(ort_session(onnx_path), ds)
    ref = ref.numpy()
    diff = float(np.abs(got - ref).max())
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    result = {
        "images": int(len(ref)),
        "max_abs_logit_diff": diff,
        "argmax_agreement": agree,
        "onnx_accuracy": float((got.argmax(1) == targets.numpy()).mean()),
        "torch_accuracy": float((ref.argmax(1) == targets.numpy()).mean()),
        "passed": bool(diff <= max_abs_diff and agree >= min_agreement),
    }
    if not result["passed"]:
        raise CheckFailed(
            f"ONNX parity failed for {onnx_path.name}: max |Δlogit| {diff:.3g} (limit {max_abs_diff:g}), "
            f"argmax agreement {agree:.4%} (limit {min_agreement:.2%}); logits reach {float(np.abs(ref).max()):.3g}"
        )
    return result
