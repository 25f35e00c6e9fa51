"""Datasets: digits (offline, the default), cifar10/cifar100 (downloaded only when asked) and
imagefolder:PATH; seeded stratified splits; upscaling to the training size; normalization."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import Dataset, Subset

from compress.errors import CompressError
from compress.evaluate import loader

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataConfig(BaseModel):
    """Which images, how they are split and fed."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dataset: str = Field("digits", description="digits | cifar10 | cifar100 | imagefolder:PATH")
    root: str = Field("data", description="where cifar10/cifar100 live or are downloaded to")
    download: bool = Field(False, description="download cifar10/cifar100 if absent (needs the network)")
    image_size: int = Field(32, ge=8, le=1024)
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.3, gt=0.0, lt=0.9)
    split_seed: int = Field(0, ge=0)
    batch_size: int = Field(64, ge=2, le=4096)
    augment: bool = Field(True, description="random shifts of up to 1/8 of the image while training")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v in ("digits", "cifar10", "cifar100") or (v.startswith("imagefolder:") and len(v) > 12):
            return v
        raise ValueError("must be digits, cifar10, cifar100 or imagefolder:PATH")


class ImageDataset(Dataset):
    """Images in memory (N, 3, H, W) already normalized, with optional random-shift augmentation.

    The shift draws from torch's global generator, which the training loop seeds per epoch, so an
    epoch is reproducible on its own (what makes resume exact)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False):
        self.images, self.labels, self.augment = images, labels.long(), augment
        self.pad = max(1, images.shape[-1] // 8)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        if self.augment:
            x = random_shift(x, self.pad)
        return x, self.labels[i]


class FileImageDataset(Dataset):
    """Image files read lazily, resized to ``size``, normalized with ImageNet statistics."""

    def __init__(self, files: list[Path], labels: list[int], size: int, mean, std, augment: bool = False):
        self.files, self.labels, self.size, self.augment = files, torch.tensor(labels).long(), size, augment
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.pad = max(1, size // 8)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = (x - self.mean) / self.std
        if self.augment:
            x = random_shift(x, self.pad)
        return x, self.labels[i]


def random_shift(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Shift an image by up to ``pad`` pixels each way, filling with the edge values."""
    h, w = x.shape[-2:]
    padded = F.pad(x.unsqueeze(0), (pad, pad, pad, pad), mode="replicate").squeeze(0)
    dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    return padded[:, dy : dy + h, dx : dx + w]


@dataclass
class DataBundle:
    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    in_chans: int = 3
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict:
        return {
            "dataset": self.name,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
        }


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int):
    """Indices (train, val, test), stratified by label, the same for the same seed."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    val_share = val_fraction / (1.0 - test_fraction)
    train, val = train_test_split(rest, test_size=val_share, stratify=labels[rest], random_state=seed)
    return np.sort(train), np.sort(val), np.sort(test)


def _to_size(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _normalized_bundle(name, x_tr, y_tr, x_va, y_va, x_te, y_te, classes, cfg: DataConfig) -> DataBundle:
    """x_* are float (N, 3, H, W) in [0, 1]; statistics come from the training split only."""
    x_tr, x_va, x_te = (_to_size(x, cfg.image_size) for x in (x_tr, x_va, x_te))
    mean = x_tr.mean(dim=(0, 2, 3))
    std = x_tr.std(dim=(0, 2, 3)).clamp_min(1e-6)

    def norm(x):
        return ((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).contiguous()

    return DataBundle(
        name=name,
        train=ImageDataset(norm(x_tr), y_tr, augment=cfg.augment),
        val=ImageDataset(norm(x_va), y_va),
        test=ImageDataset(norm(x_te), y_te),
        class_names=classes,
        mean=tuple(round(float(m), 6) for m in mean),
        std=tuple(round(float(s), 6) for s in std),
        image_size=cfg.image_size,
    )


def load_digits_bundle(cfg: DataConfig) -> DataBundle:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1).repeat(1, 3, 1, 1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    tr, va, te = stratified_split(d.target, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    classes = [str(c) for c in d.target_names]
    return _normalized_bundle(
        "digits", images[tr], labels[tr], images[va], labels[va], images[te], labels[te], classes, cfg
    )


_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ("batches.meta", "label_names"),
        "labels": "labels",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": ("meta", "fine_label_names"),
        "labels": "fine_labels",
    },
}


def _read_cifar_files(folder: Path, files: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for f in files:
        try:
            with open(folder / f, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")  # the CIFAR format itself is pickled
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.extend(entry[label_key])
        except (OSError, KeyError, ValueError, pickle.UnpicklingError, EOFError) as e:
            raise CompressError(f"CIFAR file {folder / f} is unreadable ({type(e).__name__})") from None
    x = torch.from_numpy(np.concatenate(xs)).float() / 255.0
    return x, torch.tensor(ys, dtype=torch.long)


def load_cifar_bundle(cfg: DataConfig) -> DataBundle:
    spec = _CIFAR[cfg.dataset]
    root = Path(cfg.root)
    folder = root / spec["folder"]
    if not folder.is_dir():
        if not cfg.download:
            raise CompressError(
                f"{cfg.dataset} not found at {folder}; pass --download (or data.download=true) to fetch it, "
                f"or place the python-format archive's folder there"
            )
        _download_cifar(cfg.dataset, root)
    x_all, y_all = _read_cifar_files(folder, spec["train"], spec["labels"])
    x_te, y_te = _read_cifar_files(folder, spec["test"], spec["labels"])
    meta_file, meta_key = spec["meta"]
    try:
        with open(folder / meta_file, "rb") as fh:
            classes = [str(c) for c in pickle.load(fh, encoding="latin1")[meta_key]]
    except (OSError, KeyError, pickle.UnpicklingError, EOFError):
        raise CompressError(f"CIFAR metadata {folder / meta_file} is unreadable") from None
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y_all))
    tr, va = train_test_split(idx, test_size=cfg.val_fraction, stratify=y_all.numpy(), random_state=cfg.split_seed)
    tr, va = np.sort(tr), np.sort(va)
    return _normalized_bundle(
        cfg.dataset, x_all[tr], y_all[tr], x_all[va], y_all[va], x_te, y_te, classes, cfg
    )


def _download_cifar(name: str, root: Path) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        cls(str(root), train=True, download=True)
    except Exception as e:  # noqa: BLE001
        raise CompressError(f"could not download {name} to {root} ({type(e).__name__}); check the network") from None


def _class_folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(path: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, c in enumerate(classes):
        folder = path / c
        if not folder.is_dir():
            continue
        for f in sorted(folder.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                files.append(f)
                labels.append(label)
    return files, labels


def load_imagefolder_bundle(cfg: DataConfig) -> DataBundle:
    root = Path(cfg.dataset.split(":", 1)[1]).expanduser()
    if not root.is_dir():
        raise CompressError(f"image folder not found: {root}")
    has_splits = (root / "train").is_dir()
    base = root / "train" if has_splits else root
    classes = [p.name for p in _class_folders(base)]
    if len(classes) < 2:
        raise CompressError(f"image folder {base} needs at least two class folders, found {len(classes)}")
    files, labels = _scan(base, classes)
    if not files:
        raise CompressError(f"image folder {base} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    split: dict[str, tuple[list[Path], list[int]]] = {}
    named = {s: root / s for s in ("val", "test") if has_splits and (root / s).is_dir()}
    for s, p in named.items():
        split[s] = _scan(p, classes)
    missing = [s for s in ("val", "test") if s not in split]
    if missing:
        lab = np.asarray(labels)
        fractions = {"val": cfg.val_fraction if "val" in missing else 0.0,
                     "test": cfg.test_fraction if "test" in missing else 0.0}
        idx_tr, idx_va, idx_te = _split_some(lab, fractions, cfg.split_seed)
        pick = lambda idx: ([files[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
        if "val" in missing:
            split["val"] = pick(idx_va)
        if "test" in missing:
            split["test"] = pick(idx_te)
        files, labels = pick(idx_tr)

    def ds(fl, aug=False):
        return FileImageDataset(fl[0], fl[1], cfg.image_size, IMAGENET_MEAN, IMAGENET_STD, augment=aug)

    return DataBundle(
        name=cfg.dataset,
        train=ds((files, labels), cfg.augment),
        val=ds(split["val"]),
        test=ds(split["test"]),
        class_names=classes,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        image_size=cfg.image_size,
    )


def _split_some(labels: np.ndarray, fractions: dict[str, float], seed: int):
    """Seeded split of ``labels`` into train/val/test where a zero fraction leaves that part empty;
    stratified when every class has enough images, plain shuffled otherwise."""
    rng = np.random.default_rng(seed)
    tr, va, te = [], [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_te = int(round(len(idx) * fractions["test"]))
        n_va = int(round(len(idx) * fractions["val"]))
        if fractions["test"] > 0 and len(idx) >= 3:
            n_te = max(n_te, 1)
        if fractions["val"] > 0 and len(idx) >= 3:
            n_va = max(n_va, 1)
        te.extend(idx[:n_te])
        va.extend(idx[n_te : n_te + n_va])
        tr.extend(idx[n_te + n_va :])
    return sorted(tr), sorted(va), sorted(te)


def load_data(cfg: DataConfig) -> DataBundle:
    if cfg.dataset == "digits":
        bundle = load_digits_bundle(cfg)
    elif cfg.dataset in _CIFAR:
        bundle = load_cifar_bundle(cfg)
    else:
        bundle = load_imagefolder_bundle(cfg)
    for part in ("train", "val", "test"):
        if len(getattr(bundle, part)) == 0:
            raise CompressError(f"dataset {cfg.dataset}: the {part} split is empty; add images or change the fractions")
    return bundle


def data_identity(cfg: DataConfig) -> dict:
    """What the data looks like, for stage fingerprints (where it is stored does not matter)."""
    ident = cfg.model_dump(exclude={"download", "root"})
    if cfg.dataset.startswith("imagefolder:"):
        root = Path(cfg.dataset.split(":", 1)[1]).expanduser()
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else []
        ident["files"] = [len(files), hash_strings(files)]
    return ident


def hash_strings(items: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def without_augmentation(ds: Dataset) -> Dataset:
    """The same images without random shifts (calibration and pruning importance must see the data as
    inference does)."""
    base = ds.dataset if isinstance(ds, Subset) else ds
    clean = copy.copy(base)
    clean.augment = False
    return Subset(clean, ds.indices) if isinstance(ds, Subset) else clean


def calibration_array(ds: Dataset, size: int, limit: int) -> np.ndarray:
    """Up to ``limit`` images of ``ds`` without augmentation, resized to ``size``, as float32 NCHW."""
    xs = []
    for x, _ in loader(without_augmentation(ds), 256):
        xs.append(x)
        if sum(len(b) for b in xs) >= limit:
            break
    x = torch.cat(xs)[:limit]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.numpy().astype(np.float32)
