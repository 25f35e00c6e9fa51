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


def decoded_once(ds: Dataset, max_bytes: int = 512 * 2**20) -> Dataset:
    """A split that decodes image files, decoded and transformed once into memory when its tensors fit
    in ``max_bytes``: what a training validates on every epoch (its evaluation transform is fixed, so
    every epoch would decode the same tensors again, in worker processes started anew each time).
    In-memory splits, and splits too large, come back as they are."""
    if not getattr(_base(ds), "seeded", False) or not len(ds):  # seeded: decodes files (FolderDataset)
        return ds
    x, _ = ds[0]
    if x.numel() * x.element_size() * len(ds) > max_bytes:
        return ds
    xs, ys = zip(*loader(ds, 256))
    return torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))


def loader(ds: Dataset, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None) -> DataLoader:
    drop_last = shuffle and len(ds) > batch_size  # a lone 1-image batch breaks BatchNorm
    workers = decode_workers(ds)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                      num_workers=workers if len(ds) > batch_size else 0)


class SeededBatchSampler(Sampler):
    """Shuffled batches of ``(index, seed)`` pairs: the order and every sample's seed are functions of
    the epoch seed alone (set with :meth:`set_seed` before each epoch), so an epoch is reproducible
    with persistent workers, with any number of them, and after a resume. With ``world`` processes,
    this one (``rank``) takes its share of the order as torch's DistributedSampler deals it; each
    sample keeps the seed it has in a one-process run, so augmentation does not depend on the split."""

    def __init__(self, n: int, batch_size: int, drop_last: bool, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.drop_last, self.seed = n, batch_size, drop_last, 0
        self.rank, self.world = rank, world

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(self.n, generator=g).tolist()
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g).tolist()
        if self.world > 1:  # the same permutation (same seed), dealt to the processes
            order = list(distributed_sampler(range(self.n), self.seed, self.rank, self.world))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            yield [(i, seeds[i]) for i in batch]

    def __len__(self) -> int:
        n = self.n // self.world
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def distributed_sampler(ds, seed: int, rank: int, world: int) -> "DistributedSampler":
    """This process's share of a shuffled epoch of ``ds`` (its tail that does not divide by ``world``
    dropped), through torch's DistributedSampler: the permutation is ``torch.randperm`` seeded with
    ``seed``, as a one-process epoch of a file dataset's (:class:`SeededBatchSampler`)."""
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)


def one_process_order(n: int, seed: int) -> list[int]:
    """The order in which one process's shuffled loader (:func:`loader` with a generator seeded with
    ``seed``) visits ``n`` in-memory samples, read off a DataLoader of indices built the same way."""
    return torch.cat(list(DataLoader(range(n), batch_size=n, shuffle=True,
                                     generator=torch.Generator().manual_seed(seed)))).tolist()


class TrainLoader:
    """The training batches of every epoch, from one DataLoader whose workers live as long as the
    training (persistent); ``epoch(seed)`` gives that epoch's batches. Datasets that decode files
    (``seeded``) draw per-sample seeds from :class:`SeededBatchSampler`; in-memory ones are shuffled by
    a generator seeded per epoch in the training process. Under torchrun each of the ``world``
    processes gets its share (``batch_size`` is then the per-process batch)."""

    def __init__(self, ds: Dataset, batch_size: int, pin_memory: bool = False, rank: int = 0, world: int = 1,
                 drop_last: bool | None = None):
        self.ds, self.batch_size, self.rank, self.world = ds, batch_size, rank, world
        self.seeded = bool(getattr(_base(ds), "seeded", False)) and not isinstance(ds, Subset)
        # a lone short batch breaks BatchNorm: dropped when there is more than one global batch
        self.drop_last = len(ds) > batch_size * world if drop_last is None else drop_last
        if self.seeded:
            workers = decode_workers(ds)
            self.sampler = SeededBatchSampler(len(ds), batch_size, self.drop_last, rank, world)
            self.loader = DataLoader(ds, batch_sampler=self.sampler, num_workers=workers,
                                     persistent_workers=workers > 0, pin_memory=pin_memory)

    def epoch(self, seed: int) -> DataLoader:
        if self.seeded:
            self.sampler.set_seed(seed)
            return self.loader
        if self.world == 1:
            return loader(self.ds, self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
        # one process's order, dealt to the processes by DistributedSampler: the processes' batches at
        # step k together are one process's batch k
        ordered = Subset(self.ds, one_process_order(len(self.ds), seed))
        from torch.utils.data.distributed import DistributedSampler

        share = DistributedSampler(ordered, num_replicas=self.world, rank=self.rank, shuffle=False, drop_last=True)
        workers = decode_workers(self.ds)
        return DataLoader(ordered, batch_size=self.batch_size, drop_last=self.drop_last, sampler=share,
                          num_workers=workers if len(self.ds) > self.batch_size else 0)

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
