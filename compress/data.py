"""Datasets: digits (offline, the default), cifar10/cifar100 (downloaded only when asked) and
imagefolder:PATH; seeded stratified splits; upscaling to the training size; normalization."""

from __future__ import annotations

import copy
import logging
import os
import pickle
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import Dataset, Subset

from compress.errors import CompressError
from compress.evaluate import loader

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875  # timm's
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataConfig(BaseModel):
    """Which images, how they are split, augmented and fed.

    ``image_size``, ``mean``, ``std``, ``interpolation`` and ``crop_pct`` left unset come from the
    pretrained model's configuration when a model starts from published weights, else from the data
    (the images' typical size, ImageNet statistics for photographs, the training split's statistics
    for digits and CIFAR)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dataset: str = Field("digits", description="digits | cifar10 | cifar100 | imagefolder:PATH")
    root: str = Field("data", description="where cifar10/cifar100 live or are downloaded to")
    download: bool = Field(False, description="download cifar10/cifar100 if absent (needs the network)")
    image_size: int | None = Field(None, ge=8, le=1024, description="default: from the model or the data")
    mean: tuple[float, float, float] | None = Field(None, description="per-channel input mean (0-1 scale)")
    std: tuple[float, float, float] | None = Field(None, description="per-channel input std (0-1 scale)")
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    crop_pct: float | None = Field(None, ge=0.5, le=1.0,
                                   description="evaluation: resize to size/crop_pct, then centre crop")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.3, gt=0.0, lt=0.9)
    split_seed: int = Field(0, ge=0)
    batch_size: int = Field(64, ge=2, le=4096)
    augment: bool = Field(True, description="augment the training split (photos: the settings below; "
                                            "digits and CIFAR: random shifts)")
    scale: tuple[float, float] | Literal["auto"] = Field(
        "auto", description="random-resized-crop area range (one number: from it to 1); auto: from the input "
        "size (augmentation_for)")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="random-resized-crop aspect range")
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    vflip: float = Field(0.0, ge=0.0, le=1.0)
    color_jitter: float | Literal["auto"] = Field("auto", description="colour jitter strength (unused when "
                                                 "auto_augment is set); auto: from the input size (augmentation_for)")
    auto_augment: str | None = Field(None, description="randaugment | trivialaugment | a timm policy "
                                                       "string such as rand-m9-mstd0.5-inc1")
    re_prob: float = Field(0.0, ge=0.0, le=1.0, description="random erasing probability")
    workers: int | None = Field(None, ge=0, le=256, description="image decoding processes; default: the cores")
    skip_bad_images: bool = Field(False, description="leave out unreadable images instead of refusing the run")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v in ("digits", "cifar10", "cifar100") or (v.startswith("imagefolder:") and len(v) > 12):
            return v
        raise ValueError("must be digits, cifar10, cifar100 or imagefolder:PATH")

    @field_validator("color_jitter")
    @classmethod
    def _jitter(cls, v: float | str) -> float | str:
        if v != "auto" and not 0.0 <= v <= 2.0:
            raise ValueError("must be auto or a number between 0 and 2")
        return v

    @field_validator("scale", mode="before")
    @classmethod
    def _low_only(cls, v):
        """One number is the smallest crop area; the largest is the whole image."""
        return (v, 1.0) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator("scale", "ratio")
    @classmethod
    def _range(cls, v: tuple[float, float] | str) -> tuple[float, float] | str:
        if v == "auto":
            return v
        if not 0 < v[0] <= v[1] or v[1] > 10:
            raise ValueError("must be [low, high] with 0 < low <= high")
        return v

    @field_validator("auto_augment")
    @classmethod
    def _policy(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            _train_transform_policy(v)
        except Exception:  # noqa: BLE001 - timm asserts on malformed policy strings
            raise ValueError(f"unknown augmentation policy {v!r}; use randaugment, trivialaugment or a timm "
                             "string such as rand-m9-mstd0.5-inc1") from None
        return v

    def num_workers(self) -> int:
        return default_workers() if self.workers is None else self.workers


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# named policies mapped to timm's policy strings; trivialaugment: one op, magnitude uniform over the range
POLICIES = {"randaugment": "rand-m9-mstd0.5-inc1", "trivialaugment": "rand-n1-m10-mstd101-inc1"}


def _train_transform_policy(name: str):
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    policy = POLICIES.get(name, name)
    params = {"translate_const": 10, "img_mean": (124, 116, 104)}
    if policy.startswith("rand"):
        return rand_augment_transform(policy, params)
    if policy.startswith("augmix"):
        return augment_and_mix_transform(policy, params)
    return auto_augment_transform(policy, params)


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


def open_rgb(path: str | Path):
    """A PIL RGB image from any file PIL reads: grayscale, palette (with transparency), CMYK and 16-bit
    images are converted, 16-bit values scaled to 8 bits rather than clipped."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode.startswith("I;16"):  # 16 bits whatever the values: a dark image stays dark
            a = np.asarray(im, dtype=np.float32)
            im = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8))
        elif im.mode in ("I", "F"):  # 32-bit integers or floats: the range is guessed from the values
            a = np.asarray(im, dtype=np.float32)
            top = 1.0 if im.mode == "F" and a.max() <= 1.0 else (255.0 if a.max() <= 255 else 65535.0)
            im = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8))
        elif im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        return im.convert("RGB")


def seed_sample(seed: int) -> None:
    """Seed every random source a transform may draw from, for one sample. torch's CPU generator alone:
    ``torch.manual_seed`` also queues a seed for every accelerator backend, recording the call's stack
    each time (about 1 ms a sample, 40 % of a 32-pixel image's decoding and augmentation)."""
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.random.default_generator.manual_seed(seed)


class FolderDataset(Dataset):
    """Image files decoded on demand (in DataLoader workers), with timm's training transform when
    ``augment`` is set and its evaluation transform (resize, centre crop) otherwise.

    An index may come as ``(i, seed)`` from :class:`compress.evaluate.SeededBatchSampler`: the sample's
    random augmentation then depends on that seed only, not on which worker decodes it or what it
    decoded before, so an epoch is the same with any number of workers and after a resume."""

    seeded = True

    def __init__(self, samples: list[tuple[str, int]], train_tf, eval_tf, augment: bool = False, workers: int = 0):
        self.samples, self.train_tf, self.eval_tf, self.augment = samples, train_tf, eval_tf, augment
        self.workers = workers
        self.labels = torch.tensor([c for _, c in samples], dtype=torch.long)

    @property
    def files(self) -> list[str]:
        return [f for f, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[i]
        image = open_rgb(path)
        if self.augment:
            if seed is not None:
                seed_sample(seed)
            return self.train_tf(image), self.labels[i]
        return self.eval_tf(image), self.labels[i]


class Withheld(Dataset):
    """A split that must not be read (the test split while settings are tuned): its size is known,
    reading an image raises."""

    def __init__(self, size: int, what: str = "the test split is withheld while settings are tuned"):
        self.size, self.what = size, what

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i):
        raise CompressError(self.what)


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
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    skipped_images: list[str] = field(default_factory=list)
    symlink_loops: list[tuple[str, str]] = field(default_factory=list)  # (folder, its real path): not followed
    repeated_files: list[tuple[str, str]] = field(default_factory=list)  # (path left out, the path kept)
    identical_across_splits: list[tuple[str, str]] = field(default_factory=list)  # (file, earlier same bytes)
    extra: dict = field(default_factory=dict)
    augmentation: dict | None = None  # photographs: the training transform's crop range and jitter

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
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "skipped_images": len(self.skipped_images),
            "symlink_loops": len(self.symlink_loops),
            "repeated_files": len(self.repeated_files),
            "identical_across_splits": len(self.identical_across_splits),
            "identical_examples": [[shown(f, os.path.expanduser(self.name.split(":", 1)[-1])) for f in pair]
                                   for pair in self.identical_across_splits[:10]],
            "augmentation": self.augmentation,
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


def _normalized_bundle(name, x_tr, y_tr, x_va, y_va, x_te, y_te, classes, cfg: DataConfig,
                       defaults: dict | None = None) -> DataBundle:
    """x_* are float (N, 3, H, W) in [0, 1]; statistics come from the training split only unless the
    recipe or a pretrained model fixes them."""
    defaults = defaults or {}
    size = cfg.image_size or defaults.get("input_size") or 32
    x_tr, x_va, x_te = (_to_size(x, size) for x in (x_tr, x_va, x_te))
    mean_fixed, std_fixed = cfg.mean or defaults.get("mean"), cfg.std or defaults.get("std")
    mean = torch.tensor(mean_fixed) if mean_fixed else x_tr.mean(dim=(0, 2, 3))
    std = torch.tensor(std_fixed) if std_fixed else x_tr.std(dim=(0, 2, 3)).clamp_min(1e-6)

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
        image_size=size,
    )


def load_digits_bundle(cfg: DataConfig, defaults: dict | None = None) -> DataBundle:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1).repeat(1, 3, 1, 1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    tr, va, te = stratified_split(d.target, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    classes = [str(c) for c in d.target_names]
    return _normalized_bundle(
        "digits", images[tr], labels[tr], images[va], labels[va], images[te], labels[te], classes, cfg, defaults
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


class _Refused(pickle.UnpicklingError):
    pass


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays (what CIFAR's python-format batches hold) and
    refuses every other global, so a planted file runs no code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def _read_cifar_files(folder: Path, files: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for f in files:
        try:
            with open(folder / f, "rb") as fh:
                entry = _ArraysOnly(fh, encoding="latin1").load()  # the CIFAR format itself is pickled
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.extend(entry[label_key])
        except _Refused as e:
            raise CompressError(f"CIFAR file {folder / f} is a pickle that carries code or objects ({e}), refused "
                                "for safety and not run; download the python-format archive again") from None
        except (OSError, KeyError, ValueError, pickle.UnpicklingError, EOFError) as e:
            raise CompressError(f"CIFAR file {folder / f} is unreadable ({type(e).__name__})") from None
    x = torch.from_numpy(np.concatenate(xs)).float() / 255.0
    return x, torch.tensor(ys, dtype=torch.long)


def load_cifar_bundle(cfg: DataConfig, defaults: dict | None = None) -> DataBundle:
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
            classes = [str(c) for c in _ArraysOnly(fh, encoding="latin1").load()[meta_key]]
    except (OSError, KeyError, TypeError, pickle.UnpicklingError, EOFError):
        raise CompressError(f"CIFAR metadata {folder / meta_file} is unreadable") from None
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y_all))
    tr, va = train_test_split(idx, test_size=cfg.val_fraction, stratify=y_all.numpy(), random_state=cfg.split_seed)
    tr, va = np.sort(tr), np.sort(va)
    return _normalized_bundle(
        cfg.dataset, x_all[tr], y_all[tr], x_all[va], y_all[va], x_te, y_te, classes, cfg, defaults
    )


def _download_cifar(name: str, root: Path) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        cls(str(root), train=True, download=True)
    except Exception as e:  # noqa: BLE001
        raise CompressError(f"could not download {name} to {root} ({type(e).__name__}); check the network") from None


def _contains(outer: str, inner: str) -> bool:
    """Whether the real path ``inner`` is ``outer`` or lies inside it."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _scan(path: Path, classes: list[str], top: Path | None = None) -> tuple[list[tuple[str, int, int]],
                                                                          list[tuple[str, str]]]:
    """(file, class index, symlinked folders passed on the way) for every image under ``path/<class>/``,
    in the order of torchvision's ``make_dataset`` (sorted paths), and the folders not entered.

    Symlinked folders are followed, except one whose real path holds a folder the walk is inside
    (``path``, ``top`` or one on the way from the class folder): entering it would go round a loop.
    Such folders come back as (path, real path)."""
    from torchvision.datasets.folder import has_file_allowed_extension

    exts = tuple(IMAGE_SUFFIXES | {e.upper() for e in IMAGE_SUFFIXES})
    outer = tuple(dict.fromkeys(os.path.realpath(p) for p in (top or path, path)))
    found: list[tuple[str, int, int]] = []
    loops: list[tuple[str, str]] = []

    def enter(folder: str, above: tuple[str, ...]) -> tuple[str, ...] | None:
        real = os.path.realpath(folder)
        if any(_contains(real, a) for a in above):
            loops.append((folder, real))
            return None
        return above + (real,)

    for index, name in enumerate(classes):
        target = os.path.join(os.path.expanduser(str(path)), name)
        if not os.path.isdir(target):
            continue
        chain = enter(target, outer)
        if chain is None:
            continue
        state = {target: (chain, int(os.path.islink(target)))}
        for folder, subfolders, files in os.walk(target, followlinks=True):
            above, links = state.pop(folder)
            kept = []
            for sub in subfolders:
                full = os.path.join(folder, sub)
                inside = enter(full, above)
                if inside is not None:
                    kept.append(sub)
                    state[full] = (inside, links + int(os.path.islink(full)))
            subfolders[:] = kept
            found += [(os.path.join(folder, f), index, links) for f in files if has_file_allowed_extension(f, exts)]
    return sorted(found), sorted(loops)


def _file_key(path: str) -> tuple:
    """What makes two paths one file: device and inode (symlinks followed, hard links alike), else the
    real path for a file that cannot be read."""
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except OSError:
        return ("path", os.path.realpath(path))


def _count_once(parts: dict[str, list[tuple[str, int, int]]]) -> tuple[dict[str, list[tuple[str, int]]],
                                                                       list[tuple[str, str]]]:
    """Each file once: of the paths that reach one file, the one kept is in the test split before
    val before train (an image reached from two splits is held out, not trained on), then the one
    through the fewest symlinked folders, then the first in order. Returns the parts as
    (file, class index) lists in their order, and the paths left out as (path, the path kept)."""
    rank = {"test": 0, "val": 1, "train": 2}
    keys = {part: [_file_key(f) for f, _, _ in entries] for part, entries in parts.items()}
    best: dict[tuple, tuple] = {}
    for part, entries in parts.items():
        for key, (f, _, links) in zip(keys[part], entries):
            order = (rank[part], links, f)
            if key not in best or order < best[key]:
                best[key] = order
    kept: dict[str, list[tuple[str, int]]] = {part: [] for part in parts}
    repeats = []
    for part, entries in parts.items():
        for key, (f, c, links) in zip(keys[part], entries):
            first = best[key]
            if first == (rank[part], links, f):
                kept[part].append((f, c))
            else:
                repeats.append((f, first[2]))
    return kept, sorted(repeats)


def _identical_across_splits(split: dict[str, list[tuple[str, int]]], digests: dict[str, str]) -> list[tuple[str, str]]:
    """(file, earlier file) for every file of val or test whose bytes are those of a file in an
    earlier split (train, then val)."""
    first: dict[str, str] = {}
    pairs = []
    for part in ("train", "val", "test"):
        seen_here = {}
        for f, _ in split[part]:
            d = digests.get(f)
            if d is None:
                continue
            if d in first:
                pairs.append((f, first[d]))
            else:
                seen_here.setdefault(d, f)
        for d, f in seen_here.items():
            first.setdefault(d, f)
    return pairs


def _typical_size(samples: list[tuple[str, int]], limit: int = 256) -> int:
    """The median shorter side of (up to ``limit``) training images, rounded to a multiple of 8 and
    kept within 32-224: the input size when neither the recipe nor a pretrained model sets one."""
    from PIL import Image

    step = max(1, len(samples) // limit)
    sides = []
    for f, _ in samples[::step]:
        try:
            with Image.open(f) as im:
                sides.append(min(im.size))
        except Exception:  # noqa: BLE001 - unreadable files are reported by the scan
            continue
    if not sides:
        return 224
    return int(min(224, max(32, round(float(np.median(sides)) / 8) * 8)))


def _check_one(path: str) -> tuple[str | None, str | None]:
    """(None when ``path`` decodes to an RGB image, else why not in a few words; a digest of its bytes,
    None when they cannot be read)."""
    import hashlib

    try:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        digest = h.hexdigest()[:DIGEST_CHARS]
    except OSError:
        digest = None
    try:
        if os.path.getsize(path) == 0:
            return "empty file", digest
        open_rgb(path)
        return None, digest
    except Exception as e:  # noqa: BLE001 - every way an image can fail to decode is reported, none raised
        from PIL import UnidentifiedImageError

        if isinstance(e, UnidentifiedImageError):
            return "not an image Pillow can read", digest
        text = str(e).strip().splitlines()[0][:100] if str(e).strip() else ""
        if "truncated" in text.lower() or isinstance(e, EOFError):
            return "truncated", digest
        return (f"{type(e).__name__}: {text}" if text else type(e).__name__), digest


DIGEST_CHARS = 16  # of a file's sha256, in hex: enough to tell apart the images of any folder
SCAN_FORMAT = "scan 2"  # what a cached scan holds: unreadable images and a digest of every file


def scan_images(files: list[str], cache: Path | None = None, threads: int = 4,
                keep_bad: bool = True) -> tuple[dict[str, str], dict[str, str]]:
    """Decode every image once; returns ({file: reason} for those that cannot be read, {file: digest
    of its bytes}). The answer is kept in ``cache`` under a key made of every file's path, size and
    modification time; one that finds unreadable images only with ``keep_bad`` (a run that refuses
    them leaves nothing behind)."""
    import hashlib
    import json
    from concurrent.futures import ThreadPoolExecutor

    stats = [SCAN_FORMAT]
    for f in files:
        try:
            st = os.stat(f)
            stats.append(f"{f}\t{st.st_size}\t{st.st_mtime_ns}")
        except OSError:
            stats.append(f"{f}\t-")
    key = hashlib.sha256("\n".join(stats).encode()).hexdigest()[:24]
    record = cache / f"{key}.json" if cache is not None else None
    if record is not None and record.is_file():
        try:
            kept = json.loads(record.read_text())
            if isinstance(kept.get("bad"), dict) and len(kept.get("digests", ())) == len(files):
                return dict(kept["bad"]), {f: d for f, d in zip(files, kept["digests"]) if d}
        except (ValueError, AttributeError, TypeError):
            pass
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        checked = list(pool.map(_check_one, files, chunksize=32))
    bad = {f: r for f, (r, _) in zip(files, checked) if r is not None}
    digests = [d for _, d in checked]
    if record is not None and (keep_bad or not bad):
        from compress.fsio import write_json

        try:
            write_json(record, {"bad": bad, "digests": digests})
        except OSError:
            pass
    return bad, {f: d for f, d in zip(files, digests) if d}


# ImageNet's training transform (timm's defaults) is made for 224-px photographs
IMAGENET_SIZE, IMAGENET_MIN_SCALE, IMAGENET_JITTER = 224, 0.08, 0.4
MAX_MIN_SCALE = 0.6


def augmentation_for(size: int) -> dict:
    """Random-resized-crop area range and colour jitter for images of ``size`` px, from ImageNet's
    (8-100 % of the area, jitter 0.4 at 224 px). The smallest crop keeps the same number of source
    pixels per output side as ImageNet's relative to its size: its area share grows as 224 / size
    (0.08 at 224, 0.28 at 64, 0.56 at 32, at most 0.6), since a small image upscaled from a small
    crop has little left to recognise. Colour jitter shrinks with the square root of the size (0.4 at
    224, 0.21 at 64, 0.15 at 32): the fewer pixels, the more of the class colour carries."""
    ratio = IMAGENET_SIZE / max(8, size)
    low = round(min(MAX_MIN_SCALE, max(IMAGENET_MIN_SCALE, IMAGENET_MIN_SCALE * ratio)), 3)
    jitter = round(IMAGENET_JITTER * min(1.0, ratio ** -0.5), 3)
    return {"scale": (low, 1.0), "color_jitter": jitter}


def resolved_augmentation(cfg: DataConfig, size: int) -> dict:
    """The recipe's augmentation with ``auto`` values replaced by :func:`augmentation_for`, and which
    of them were derived (``derived``: the keys, empty when the recipe set them all)."""
    rule = augmentation_for(size)
    out = {"scale": tuple(cfg.scale) if cfg.scale != "auto" else rule["scale"],
           "color_jitter": cfg.color_jitter if cfg.color_jitter != "auto" else rule["color_jitter"]}
    out["derived"] = [k for k in ("scale", "color_jitter") if getattr(cfg, k) == "auto"]
    return out


def image_transforms(cfg: DataConfig, size: int, mean, std, interpolation: str, crop_pct: float,
                     augmentation: dict | None = None):
    """(training transform, evaluation transform), both from timm's ``create_transform``;
    ``augmentation``: the resolved crop range and jitter (default: :func:`resolved_augmentation`)."""
    from timm.data import create_transform

    eval_tf = create_transform(size, is_training=False, interpolation=interpolation, mean=mean, std=std,
                               crop_pct=crop_pct)
    if not cfg.augment:
        return eval_tf, eval_tf
    aug = augmentation or resolved_augmentation(cfg, size)
    train_tf = create_transform(
        size, is_training=True, scale=aug["scale"], ratio=cfg.ratio, hflip=cfg.hflip, vflip=cfg.vflip,
        color_jitter=aug["color_jitter"],
        auto_augment=POLICIES.get(cfg.auto_augment, cfg.auto_augment) if cfg.auto_augment else None,
        interpolation=interpolation, mean=mean, std=std, re_prob=cfg.re_prob)
    return train_tf, eval_tf


def load_imagefolder_bundle(cfg: DataConfig, defaults: dict | None = None, scan_cache: Path | None = None) -> DataBundle:
    from torchvision.datasets.folder import find_classes

    defaults = defaults or {}
    root = Path(cfg.dataset.split(":", 1)[1]).expanduser()
    if not root.is_dir():
        raise CompressError(f"image folder not found: {root}")
    has_splits = (root / "train").is_dir()
    base = root / "train" if has_splits else root
    try:
        classes, _ = find_classes(str(base))
    except (FileNotFoundError, OSError):
        classes = []
    classes = [c for c in classes if not c.startswith(".")]
    if len(classes) < 2:
        raise CompressError(f"image folder {base} needs at least two class folders, found {len(classes)}")
    found, loops = _scan(base, classes, root)
    if not found:
        raise CompressError(f"image folder {base} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    parts = {"train": found}
    for s in ("val", "test"):
        if has_splits and (root / s).is_dir():
            parts[s], more = _scan(root / s, classes, root)
            loops += more
    kept, repeats = _count_once(parts)
    samples, named = kept.pop("train"), kept
    every = samples + [x for part in named.values() for x in part]
    bad, digests = scan_images([f for f, _ in every], scan_cache, threads=max(2, cfg.num_workers()),
                               keep_bad=cfg.skip_bad_images)
    if bad:
        first = sorted(bad)[0]
        if not cfg.skip_bad_images:
            raise CompressError(f"image folder {root}: {len(bad)} unreadable image(s), first {first} "
                                f"({bad[first]}); remove them or set data.skip_bad_images: true")
        samples = [x for x in samples if x[0] not in bad]
        named = {k: [x for x in v if x[0] not in bad] for k, v in named.items()}
    split = dict(named)
    missing = [s for s in ("val", "test") if s not in split]
    if missing:
        lab = np.asarray([c for _, c in samples])
        fractions = {"val": cfg.val_fraction if "val" in missing else 0.0,
                     "test": cfg.test_fraction if "test" in missing else 0.0}
        idx_tr, idx_va, idx_te = _split_some(lab, fractions, cfg.split_seed)
        for s_name, idx in (("val", idx_va), ("test", idx_te)):
            if s_name in missing:
                split[s_name] = [samples[i] for i in idx]
        samples = [samples[i] for i in idx_tr]
    split["train"] = samples
    identical = _identical_across_splits(split, digests)
    _warn_about_folder(root, loops, repeats, identical)
    size = cfg.image_size or defaults.get("input_size") or _typical_size(samples)
    mean = tuple(cfg.mean or defaults.get("mean") or IMAGENET_MEAN)
    std = tuple(cfg.std or defaults.get("std") or IMAGENET_STD)
    interpolation = cfg.interpolation or defaults.get("interpolation") or "bilinear"
    crop_pct = cfg.crop_pct or defaults.get("crop_pct") or DEFAULT_CROP_PCT
    augmentation = resolved_augmentation(cfg, size)
    train_tf, eval_tf = image_transforms(cfg, size, mean, std, interpolation, crop_pct, augmentation)
    workers = cfg.num_workers()
    return DataBundle(
        name=cfg.dataset,
        train=FolderDataset(samples, train_tf, eval_tf, augment=cfg.augment, workers=workers),
        val=FolderDataset(split["val"], train_tf, eval_tf, workers=workers),
        test=FolderDataset(split["test"], train_tf, eval_tf, workers=workers),
        class_names=classes,
        mean=mean,
        std=std,
        image_size=size,
        interpolation=interpolation,
        crop_pct=crop_pct,
        skipped_images=sorted(bad),
        symlink_loops=loops,
        repeated_files=repeats,
        identical_across_splits=identical,
        augmentation={"scale": list(augmentation["scale"]), "color_jitter": augmentation["color_jitter"],
                      "derived": augmentation["derived"]} if cfg.augment else None,
    )


def shown(path: str, root: str | Path) -> str:
    """``path`` relative to the image folder ``root`` when it lies below it, else as it is."""
    r = os.path.relpath(path, root)
    return path if r == ".." or r.startswith(".." + os.sep) else r


def _warn_about_folder(root: Path, loops: list[tuple[str, str]], repeats: list[tuple[str, str]],
                       identical: list[tuple[str, str]]) -> None:
    """One warning line each for symlink loops not followed, paths that reach a file already counted
    and files whose bytes recur in another split, naming the first few."""
    def named(items: list[str]) -> str:
        more = f" and {len(items) - 3} more" if len(items) > 3 else ""
        return ", ".join(items[:3]) + more

    if loops:
        log.warning(f"image folder {root}: symlink loop: {len(loops)} folder(s) lead back into a folder they are in "
                    f"and were not followed: {named([f'{shown(a, root)} -> {b}' for a, b in loops])}")
    if repeats:
        log.warning(f"image folder {root}: {len(repeats)} path(s) reach an image already counted (through symlinks "
                    f"or hard links) and were left out; each image counts once, in one split: "
                    f"{named([f'{shown(a, root)} is {shown(b, root)}' for a, b in repeats])}")
    if identical:
        log.warning(f"image folder {root}: {len(identical)} image(s) of the val/test splits have the same bytes as "
                    f"an image of an earlier split; kept: "
                    f"{named([f'{shown(a, root)} = {shown(b, root)}' for a, b in identical])}")


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


def load_data(cfg: DataConfig, defaults: dict | None = None, scan_cache: Path | None = None) -> DataBundle:
    """The recipe's dataset, split and transformed. ``defaults``: input settings of a pretrained model
    (``mean``, ``std``, ``input_size``, ``interpolation``, ``crop_pct``) for what the recipe leaves unset;
    ``scan_cache``: where the unreadable-image scan keeps its answers."""
    if cfg.dataset == "digits":
        bundle = load_digits_bundle(cfg, defaults)
    elif cfg.dataset in _CIFAR:
        bundle = load_cifar_bundle(cfg, defaults)
    else:
        bundle = load_imagefolder_bundle(cfg, defaults, scan_cache)
    for part in ("train", "val", "test"):
        if len(getattr(bundle, part)) == 0:
            raise CompressError(f"dataset {cfg.dataset}: the {part} split is empty; add images or change the fractions")
    return bundle


def data_identity(cfg: DataConfig, resolved: DataBundle | None = None) -> dict:
    """What the data looks like, for stage fingerprints (where it is stored, how many processes decode
    it and the scan's cache do not matter). ``resolved``: the loaded bundle, whose input settings may
    come from a pretrained model."""
    ident = cfg.model_dump(mode="json", exclude={"download", "root", "workers"})
    if resolved is not None:
        ident["resolved"] = {"image_size": resolved.image_size, "mean": list(resolved.mean),
                             "std": list(resolved.std), "interpolation": resolved.interpolation,
                             "crop_pct": resolved.crop_pct, "skipped": len(resolved.skipped_images)}
        # a folder whose walk met a loop or a file twice: what was left out (absent otherwise)
        for key, n in (("loops", len(resolved.symlink_loops)), ("repeats", len(resolved.repeated_files))):
            if n:
                ident["resolved"][key] = n
        if resolved.augmentation is not None:
            ident["resolved"]["augmentation"] = {k: resolved.augmentation[k] for k in ("scale", "color_jitter")}
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
