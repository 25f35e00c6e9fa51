import pickle

import numpy as np
import pytest
import torch

from compress.config import DataConfig
from compress.data import load_data
from compress.errors import CompressError


def test_digits_split_is_fixed_stratified_and_normalized():
    a = load_data(DataConfig(image_size=32))
    b = load_data(DataConfig(image_size=32))
    assert (len(a.train), len(a.val), len(a.test)) == (1077, 180, 540)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.test.images.shape[1:] == (3, 32, 32)
    counts = torch.bincount(a.test.labels, minlength=10)
    assert counts.min() >= 52 and counts.max() <= 56  # stratified: 540 / 10 each, give or take
    x = a.train.images
    assert x.mean().abs() < 1e-4 and (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    c = load_data(DataConfig(split_seed=1))
    assert not torch.equal(a.test.labels, c.test.labels)


def test_augmentation_only_on_train_and_seeded():
    d = load_data(DataConfig(image_size=16))
    torch.manual_seed(3)
    x1 = d.train[0][0]
    torch.manual_seed(3)
    assert torch.equal(x1, d.train[0][0])
    assert torch.equal(d.test[0][0], d.test.images[0])


def _write_cifar10(root, n_train_per_batch=6, n_test=10):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        labels = [j % 10 for j in range(n_train_per_batch * (i - 1), n_train_per_batch * i)]
        data = rng.integers(0, 256, (n_train_per_batch, 3072), dtype=np.uint8)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                     "labels": list(range(10))[:n_test]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def test_cifar10_from_a_tiny_folder(tmp_path):
    _write_cifar10(tmp_path)
    d = load_data(DataConfig(dataset="cifar10", root=str(tmp_path), image_size=16, val_fraction=0.34))
    assert d.num_classes == 10 and d.class_names[3] == "class3"
    assert len(d.test) == 10
    assert len(d.train) + len(d.val) == 30
    assert d.train[0][0].shape == (3, 16, 16)


def test_cifar_absent_without_download_says_how(tmp_path):
    with pytest.raises(CompressError, match="--download"):
        load_data(DataConfig(dataset="cifar100", root=str(tmp_path)))


def _write_pngs(folder, classes=("cat", "dog", "owl"), per_class=6, size=10):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")


def test_imagefolder_seeded_split(tmp_path):
    _write_pngs(tmp_path / "imgs")
    cfg = DataConfig(dataset=f"imagefolder:{tmp_path / 'imgs'}", image_size=16, val_fraction=0.2, test_fraction=0.3)
    d = load_data(cfg)
    assert d.class_names == ["cat", "dog", "owl"]
    assert len(d.train) + len(d.val) + len(d.test) == 18
    assert len(d.test) == 6 and len(d.val) == 3
    x, y = d.test[0]
    assert x.shape == (3, 16, 16) and 0 <= int(y) < 3
    assert load_data(cfg).test.files == d.test.files


def test_imagefolder_with_split_folders(tmp_path):
    root = tmp_path / "ds"
    _write_pngs(root / "train", per_class=4)
    _write_pngs(root / "test", per_class=2)
    d = load_data(DataConfig(dataset=f"imagefolder:{root}", image_size=16, val_fraction=0.25))
    assert len(d.test) == 6 and all("/test/" in str(f) for f in d.test.files)
    assert len(d.train) + len(d.val) == 12 and len(d.val) == 3


def test_imagefolder_errors(tmp_path):
    with pytest.raises(CompressError, match="not found"):
        load_data(DataConfig(dataset=f"imagefolder:{tmp_path / 'absent'}"))
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(CompressError, match="at least two class folders"):
        load_data(DataConfig(dataset=f"imagefolder:{tmp_path / 'one'}"))
