"""Running a model over a split: the one loader, PyTorch predictions, onnxruntime sessions and
predictions, and the accuracy of an ONNX file. Used by training, export, bench and the reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from compress.errors import CompressError, short
from compress.metrics import accuracy


def loader(ds: Dataset, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None) -> DataLoader:
    drop_last = shuffle and len(ds) > batch_size  # a lone 1-image batch breaks BatchNorm
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last, num_workers=0)


@torch.no_grad()
def predict(model: nn.Module, ds: Dataset, batch_size: int = 256, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets for a whole split, in order."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, targets = [], []
    for x, y in loader(ds, batch_size):
        logits.append(model(x.to(device)).float().cpu())
        targets.append(y)
    model.train(was_training)
    return torch.cat(logits), torch.cat(targets)


def ort_session(path: Path, threads: int = 0, optimized_path: Path | None = None):
    """An onnxruntime CPU session with every graph optimization; ``threads=0`` uses every core."""
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
        raise CompressError(f"onnxruntime cannot load {path}: {short(e, 200, typed=False)}") from None


def ort_predict(session, ds: Dataset, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Logits and targets of a whole split through an onnxruntime session."""
    name = session.get_inputs()[0].name
    outs, ys = [], []
    for x, y in loader(ds, batch_size):
        outs.append(session.run(None, {name: x.numpy()})[0])
        ys.append(y.numpy())
    return np.concatenate(outs), np.concatenate(ys)


def onnx_accuracy(path: Path, ds: Dataset) -> float:
    return accuracy(*ort_predict(ort_session(path), ds))
