"""Run by tests/test_distributed.py, alone or under torchrun: two epochs of KD for a tiny student on
tiny data through the one training loop, once on in-memory data and once on data served by seeded
keys (as image folders are); each process saves its final students as ``OUT/rank<R>-<data>.pt`` and
the validation accuracy of each epoch as ``OUT/rank<R>-<data>.json``.

    python tests/ddp_fit.py OUT
    torchrun --standalone --nproc_per_node=2 tests/ddp_fit.py OUT
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

from torch.utils.data import Dataset

from compress import dist
from compress.data import ImageDataset
from compress.distill import build_method
from compress.train import TrainConfig, fit


class Keyed(Dataset):
    """Tensors served by (index, seed) keys, as compress's file datasets are: the training loop then
    deals one seeded permutation to the processes, so two processes see a one-process run's batches."""

    seeded = True

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.labels = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        return self.x[i], self.labels[i]


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # no BatchNorm: on CPU each process normalizes its own share, which a one-process run cannot match
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init(["cpu"])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 3, 8, 8, generator=g), torch.randint(0, 4, (96,), generator=g)
    for kind, make in (("memory", ImageDataset), ("keyed", Keyed)):
        train, val = make(x[:80], y[:80]), make(x[80:], y[80:])
        teacher, student = tiny_net(1), tiny_net(2)
        kd = build_method("kd", {}, alpha=0.9, temperature=4.0).bind(student, [teacher], image_size=8)
        cfg = TrainConfig(epochs=2, lr=0.1, warmup_epochs=0, device="cpu")
        result = fit(student, train, val, cfg, kd, out / f"work-{kind}", seed=0, batch_size=16, desc=f"tiny kd ({kind})")
        torch.save(student.state_dict(), out / f"rank{dist.rank()}-{kind}.pt")
        (out / f"rank{dist.rank()}-{kind}.json").write_text(json.dumps([r["val_acc"] for r in result.history]))
    dist.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
