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

from compress.errors import CheckFailed, CompressError, short
from compress.evaluate import loader, ort_predict, ort_session, predict
from compress.fsio import atomic_path
from compress.metrics import accuracy

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
                errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {short(e)}")
        else:
            raise CompressError(f"ONNX export of {type(model).__name__} failed ({'; '.join(errors)})")
        proto = onnx.load(str(tmp))
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as e:
            raise CompressError(f"exported ONNX does not pass onnx.checker: {short(e, 1000, typed=False)}") from None
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


def logit_excess(got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> float:
    """The largest ratio |got - ref| / (atol + rtol·max|ref of that image|) over all logits: at most 1
    when every logit is within tolerance. Float32 error grows with the size of the values a network
    carries, so the tolerance grows with each image's largest logit (numpy.allclose's atol + rtol form)."""
    scale = atol + rtol * np.abs(ref).max(axis=1, keepdims=True)
    return float((np.abs(got - ref) / scale).max()) if ref.size else 0.0


def float32_error(model: nn.Module, ds: Dataset, ref: np.ndarray) -> dict | None:
    """How far the float32 logits ``ref`` of ``model`` on ``ds`` are from a float64 run of the same
    model: the largest error relative to each image's largest |logit|, and the float64 logits. None
    when the model does not run in float64."""
    import copy

    try:
        exact = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            ref64 = np.concatenate([exact(x.double()).numpy() for x, _ in loader(ds, 256)])
    except Exception:  # noqa: BLE001 - a model with float32-only operations keeps the fixed tolerance
        return None
    scale = np.abs(ref64).max(axis=1, keepdims=True) + 1e-12
    return {"max_rel": float((np.abs(ref.astype(np.float64) - ref64) / scale).max()), "logits": ref64}


def parity(model: nn.Module, onnx_path: Path, ds: Dataset, max_abs_diff: float, min_agreement: float,
           rtol: float = 0.0, float64_factor: float | None = None) -> dict:
    """Compare ONNX (onnxruntime) and PyTorch logits on the whole split; fail past the tolerances
    (``max_abs_diff`` + ``rtol`` × the image's largest |logit|, and the argmax agreement).

    ``float64_factor``: the float32 noise of this network on this split sets the relative tolerance
    too. The model also runs in float64; PyTorch's float32 logits differ from those by at most r
    (relative to each image's largest |logit|), and onnxruntime's float32 kernels, which add and
    multiply in other orders, may differ by a few times as much: the relative tolerance becomes
    max(``rtol``, ``float64_factor`` × r). An image whose top class differs counts as agreeing when
    its two largest float64 logits lie within that tolerance of each other (a tie float32 cannot
    break), so noise never refuses a correct file."""
    model = model.eval().cpu()
    ref, targets = predict(model, ds)
    got, _ = ort_predict(ort_session(onnx_path), ds)
    ref = ref.numpy()
    noise = float32_error(model, ds, ref) if float64_factor is not None else None
    rtol_used = max(rtol, float64_factor * noise["max_rel"]) if noise is not None else rtol
    diff = float(np.abs(got - ref).max())
    within = logit_excess(got, ref, max_abs_diff, rtol_used) <= 1.0
    flipped = got.argmax(1) != ref.argmax(1)
    tied = np.zeros_like(flipped)
    if noise is not None and flipped.any():
        top2 = np.sort(noise["logits"], axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        allowed = max_abs_diff + rtol_used * np.abs(noise["logits"]).max(axis=1)
        tied = flipped & (margin <= 2 * allowed)
    agree = float((~flipped | tied).mean())
    result = {
        "images": int(len(ref)),
        "max_abs_logit_diff": diff,
        "logit_range": [float(ref.min()), float(ref.max())],  # the PyTorch model's, over the split
        "argmax_agreement": agree,
        "onnx_accuracy": accuracy(got, targets.numpy()),
        "torch_accuracy": accuracy(ref, targets.numpy()),
        # none when only the agreement is checked (INT8); JSON has no infinity
        "tolerance": {"atol": max_abs_diff, "rtol": rtol_used} if np.isfinite(max_abs_diff) else None,
        "min_argmax_agreement": min_agreement,
        "passed": bool(within and agree >= min_agreement),
    }
    if noise is not None:
        result["float32_noise"] = {"torch_vs_float64_max_rel": noise["max_rel"], "factor": float64_factor,
                                   "recipe_rtol": rtol, "top_class_ties": int(tied.sum()),
                                   "onnx_vs_float64_max_abs": float(np.abs(got - noise["logits"]).max())}
    if not result["passed"]:
        limit = (f" (limit {max_abs_diff:g} + {rtol_used:g} × the image's largest |logit|)"
                 if np.isfinite(max_abs_diff) else "")
        raise CheckFailed(
            f"ONNX parity failed for {onnx_path.name}: max |Δlogit| {diff:.3g}{limit}, "
            f"argmax agreement {agree:.4%} (limit {min_agreement:.2%}); logits reach {float(np.abs(ref).max()):.3g}",
            details=result)
    return result
