"""Running a model over a split: the one loader, PyTorch predictions, onnxruntime sessions and
predictions, and the accuracy of an ONNX file. Used by training, export, bench and the reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from compress.errors import CompressError, short
from compress.metrics import accuracy


def _base(ds: Dataset) -> Dataset:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def decode_workers(ds: Dataset) -> int:
    """Worker processes for a dataset that decodes files (its ``workers``); in-memory data needs none."""
    return int(getattr(_base(ds), "workers", 0) or 0)


def loader(ds: Dataset, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None) -> DataLoader:
    drop_last = shuffle and len(ds) > batch_size  # a lone 1-image batch breaks BatchNorm
    workers = decode_workers(ds)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                      num_workers=workers if len(ds) > batch_size else 0)


class SeededBatchSampler(Sampler):
    """Shuffled batches of ``(index, seed)`` pairs: the order and every sample's seed are functions of
    the epoch seed alone (set with :meth:`set_seed` before each epoch), so an epoch is reproducible
    with persistent workers, with any number of them, and after a resume."""

    def __init__(self, n: int, batch_size: int, drop_last: bool):
        self.n, self.batch_size, self.drop_last, self.seed = n, batch_size, drop_last, 0

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(self.n, generator=g).tolist()
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g).tolist()
        for start in range(0, self.n, self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            yield [(i, seeds[i]) for i in batch]

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)


class TrainLoader:
    """The training batches of every epoch, from one DataLoader whose workers live as long as the
    training (persistent); ``epoch(seed)`` gives that epoch's batches. Datasets that decode files
    (``seeded``) draw per-sample seeds from :class:`SeededBatchSampler`; in-memory ones are shuffled by
    a generator seeded per epoch in the training process."""

    def __init__(self, ds: Dataset, batch_size: int, pin_memory: bool = False):
        self.ds, self.batch_size = ds, batch_size
        self.seeded = bool(getattr(_base(ds), "seeded", False)) and not isinstance(ds, Subset)
        drop_last = len(ds) > batch_size
        if self.seeded:
            workers = decode_workers(ds)
            self.sampler = SeededBatchSampler(len(ds), batch_size, drop_last)
            self.loader = DataLoader(ds, batch_sampler=self.sampler, num_workers=workers,
                                     persistent_workers=workers > 0, pin_memory=pin_memory)

    def epoch(self, seed: int) -> DataLoader:
        if self.seeded:
            self.sampler.set_seed(seed)
            return self.loader
        return loader(self.ds, self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))

    def close(self) -> None:
        """Let the persistent workers go (they end when their DataLoader is released)."""
        self.loader = None


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
