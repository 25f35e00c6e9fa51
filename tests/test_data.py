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


def _shifted(x, dy, dx):
    """``x`` moved by (dy, dx) pixels, the pixels beyond its border copied from the nearest edge."""
    h, w = x.shape[-2:]
    rows = torch.arange(h).add(dy).clamp(0, h - 1)
    cols = torch.arange(w).add(dx).clamp(0, w - 1)
    return x[:, rows][:, :, cols]


def test_augmentation_only_on_train_and_seeded():
    """A training sample is its stored image shifted by up to 16 // 8 = 2 pixels each way (edges
    copied), drawn anew each time from torch's generator; validation and test samples are as stored."""
    d = load_data(DataConfig(image_size=16))
    stored = d.train.images[0]
    shifts = {(dy, dx): _shifted(stored, dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    assert len({tuple(v.flatten().tolist()) for v in shifts.values()}) == 25  # the image tells every shift apart
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        x = d.train[0][0]
        match = [s for s, v in shifts.items() if torch.equal(x, v)]
        assert len(match) == 1, f"seed {seed}: not a shift of the stored image by at most 2 pixels"
        seen.add(match[0])
        torch.manual_seed(seed)
        assert torch.equal(x, d.train[0][0])
    # 40 draws of 25 equally likely shifts: every row and column offset occurs, most pairs do
    assert len(seen) >= 15, sorted(seen)
    assert {dy for dy, _ in seen} == {dx for _, dx in seen} == {-2, -1, 0, 1, 2}, sorted(seen)
    for split in (d.val, d.test):
        for i in (0, 1, len(split) - 1):
            assert torch.equal(split[i][0], split.images[i])
    plain = load_data(DataConfig(image_size=16, augment=False))
    assert all(torch.equal(plain.train[i][0], plain.train.images[i]) for i in range(5))


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


def _image_modes(folder):
    """One image per unusual mode PIL writes: grayscale, palette with transparency, 16-bit, CMYK, RGBA."""
    from PIL import Image

    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    folder.mkdir(parents=True, exist_ok=True)
    rgb.convert("L").save(folder / "gray.png")
    pal = rgb.convert("P")
    pal.info["transparency"] = 0
    pal.save(folder / "palette.png", transparency=0)
    Image.fromarray((rng.integers(0, 65536, (20, 24))).astype(np.uint16)).save(folder / "sixteen.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("RGBA").save(folder / "alpha.png")
    rgb.save(folder / "photo.jpg")


def test_every_image_mode_opens_as_rgb(tmp_path):
    from compress.data import open_rgb

    _image_modes(tmp_path)
    for f in sorted(tmp_path.iterdir()):
        im = open_rgb(f)
        assert im.mode == "RGB" and im.size == (24, 20), f.name
    sixteen = np.asarray(open_rgb(tmp_path / "sixteen.png"))
    assert 40 < sixteen.mean() < 215  # scaled from 16 bits, not clipped to white


def _folder_with_modes(root):
    for c in ("a", "b"):
        _image_modes(root / c)


def test_folder_pipeline_transforms_size_from_data_and_seeded_samples(tmp_path):
    _folder_with_modes(tmp_path / "imgs")
    d = load_data(DataConfig(dataset=f"imagefolder:{tmp_path / 'imgs'}", val_fraction=0.2, test_fraction=0.2,
                             workers=0))
    assert d.image_size == 32  # the images' shorter side (20) rounded, kept >= 32
    assert d.crop_pct == 0.875 and d.interpolation == "bilinear" and d.describe()["skipped_images"] == 0
    x1, _ = d.train[(0, 123)]
    x2, _ = d.train[(0, 123)]
    x3, _ = d.train[(0, 124)]
    assert x1.shape == (3, 32, 32) and torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(d.test[0][0], d.test[0][0])  # evaluation: resize and centre crop, no randomness


def test_training_batches_are_the_same_with_or_without_workers(tmp_path):
    from compress.evaluate import TrainLoader

    _write_pngs(tmp_path / "imgs", per_class=8, size=24)
    cfg = DataConfig(dataset=f"imagefolder:{tmp_path / 'imgs'}", image_size=16, workers=2,
                     val_fraction=0.1, test_fraction=0.1)
    train = load_data(cfg).train
    feed = TrainLoader(train, 4)
    try:
        two = [[(x.clone(), y.clone()) for x, y in feed.epoch(s)] for s in (7, 8, 7)]
    finally:
        feed.close()
    train.workers = 0
    none = [(x, y) for x, y in TrainLoader(train, 4).epoch(7)]
    same = lambda a, b: all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))  # noqa: E731
    assert same(two[0], two[2]) and same(two[0], none) and not same(two[0], two[1])


def test_unreadable_images_refused_or_skipped(tmp_path):
    root = tmp_path / "imgs"
    _write_pngs(root, per_class=6, size=12)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    cfg = DataConfig(dataset=f"imagefolder:{root}", image_size=16, workers=0)
    with pytest.raises(CompressError, match=r"2 unreadable image\(s\), first .*empty.jpg.*skip_bad_images"):
        load_data(cfg)
    d = load_data(cfg.model_copy(update={"skip_bad_images": True}), scan_cache=tmp_path / "scans")
    assert d.describe()["skipped_images"] == 2 and len(d.train) + len(d.val) + len(d.test) == 18
    assert len(list((tmp_path / "scans").iterdir())) == 1  # the scan's answer is kept for the next run


def test_augmentation_policy_names_are_checked():
    assert DataConfig(auto_augment="trivialaugment").auto_augment == "trivialaugment"
    assert DataConfig(auto_augment="rand-m7-mstd0.5").auto_augment
    with pytest.raises(ValueError, match="unknown augmentation policy"):
        DataConfig(auto_augment="sharpen-everything")


def test_pretrained_input_settings_fill_what_the_recipe_leaves_unset(tmp_path):
    from compress.config import validate_recipe
    from compress.context import input_defaults

    _write_pngs(tmp_path / "imgs", per_class=6, size=20)
    ds = f"imagefolder:{tmp_path / 'imgs'}"
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")  # only its presence is checked here; input settings come from the model's config
    cfg = validate_recipe({"name": "p", "data": {"dataset": ds}, "distill": {"student": "mobilenetv2_050",
                                                                             "pretrained": str(weights)}})
    defaults = input_defaults(cfg)
    assert defaults["input_size"] == 224 and defaults["interpolation"] == "bicubic"
    d = load_data(cfg.data, defaults=defaults)
    assert (d.image_size, d.interpolation, d.crop_pct) == (224, "bicubic", defaults["crop_pct"])
    assert d.train[(0, 1)][0].shape == (3, 224, 224)
    own = load_data(cfg.data.model_copy(update={"image_size": 48, "interpolation": "bilinear"}), defaults=defaults)
    assert (own.image_size, own.interpolation) == (48, "bilinear")  # the recipe wins
    assert input_defaults(validate_recipe({"name": "q", "data": {"dataset": ds}})) is None


def test_a_validation_split_of_image_files_is_decoded_once(tmp_path):
    """What a training validates on every epoch: the same tensors as decoding the files, held in memory
    when they fit; a split too large for the limit, and an in-memory split, are used as they are."""
    import torch

    from compress.evaluate import decoded_once, predict

    _write_pngs(tmp_path / "imgs", per_class=12)
    d = load_data(DataConfig(dataset=f"imagefolder:{tmp_path / 'imgs'}", image_size=16, val_fraction=0.3, workers=0))
    held = decoded_once(d.val)
    assert isinstance(held, torch.utils.data.TensorDataset) and len(held) == len(d.val)
    for i in range(len(d.val)):
        assert torch.equal(held[i][0], d.val[i][0]) and int(held[i][1]) == int(d.val[i][1])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    for a, b in zip(predict(model, held), predict(model, d.val)):
        assert torch.equal(a, b)
    assert decoded_once(d.val, max_bytes=3 * 16 * 16 * 4 * len(d.val) - 1) is d.val
    digits = load_data(DataConfig(image_size=16))
    assert decoded_once(digits.val) is digits.val


def _warnings_of_data(monkeypatch) -> list[str]:
    """The warning lines compress.data logs, kept in a list."""
    import compress.data

    said: list[str] = []
    monkeypatch.setattr(compress.data.log, "warning", said.append)
    return said


def _real_files(part) -> set:
    import os

    return {(os.stat(f).st_dev, os.stat(f).st_ino) for f in part.files}


def test_a_symlink_loop_is_walked_once_and_named(tmp_path, monkeypatch):
    """``a/up -> ..`` (a folder linked back to the image folder) is not followed: 16 images train,
    validate and test as 16, no file in two splits, one warning names the link. A link to a folder
    that holds the image folder is the same loop, named where it starts."""
    import os

    from compress.data import data_identity

    root = tmp_path / "loop"
    _write_pngs(root, classes=("a", "b"), per_class=8)
    os.symlink("..", root / "a" / "up")
    said = _warnings_of_data(monkeypatch)
    cfg = DataConfig(dataset=f"imagefolder:{root}", image_size=16, workers=0)
    d = load_data(cfg, scan_cache=tmp_path / "scans")
    parts = (d.train, d.val, d.test)
    assert [len(p) for p in parts] == [10, 2, 4]
    assert len(set.union(*map(_real_files, parts))) == 16  # every image once, in one split
    assert said == [f"image folder {root}: symlink loop: 1 folder(s) lead back into a folder they are in and were "
                    f"not followed: a/up -> {root}"]
    described = d.describe()
    assert (described["symlink_loops"], described["repeated_files"], described["identical_across_splits"]) == (1, 0, 0)
    assert data_identity(cfg, d)["resolved"]["loops"] == 1  # not the fingerprint of a run that went round the loop
    again = load_data(cfg, scan_cache=tmp_path / "scans")
    assert again.train.files == d.train.files and again.test.files == d.test.files
    assert len(list((tmp_path / "scans").iterdir())) == 1

    inner = tmp_path / "outer" / "inner"
    _write_pngs(inner, classes=("a", "b"), per_class=8)
    (inner / "b" / "deep").mkdir()
    os.symlink(tmp_path / "outer", inner / "b" / "deep" / "top")
    said.clear()
    d = load_data(DataConfig(dataset=f"imagefolder:{inner}", image_size=16, workers=0))
    assert len(d.train) + len(d.val) + len(d.test) == 16
    assert said == [f"image folder {inner}: symlink loop: 1 folder(s) lead back into a folder they are in and were "
                    f"not followed: b/deep/top -> {tmp_path / 'outer'}"]


def test_one_file_reached_twice_counts_once_in_one_split(tmp_path, monkeypatch):
    """A hard link, a symlinked file and a symlinked folder reach images already counted: each image
    counts once; one reached from train/ and test/ is tested on, not trained on; one reached from two
    classes keeps the class of its direct path."""
    import os

    from compress.data import data_identity

    root = tmp_path / "ds"
    _write_pngs(root / "train", classes=("ant", "bee"), per_class=4)
    _write_pngs(root / "test", classes=("ant", "bee"), per_class=2, size=11)
    os.link(root / "train" / "ant" / "0.png", root / "test" / "ant" / "h.png")
    os.symlink("../../test/bee/0.png", root / "train" / "bee" / "s.png")
    os.symlink("../bee", root / "train" / "ant" / "more")  # bee's images again, under ant
    said = _warnings_of_data(monkeypatch)
    cfg = DataConfig(dataset=f"imagefolder:{root}", image_size=16, workers=0, val_fraction=0.25)
    d = load_data(cfg)
    learn, test = _real_files(d.train) | _real_files(d.val), _real_files(d.test)
    assert not learn & test
    assert len(d.train) + len(d.val) == 7 and len(d.test) == 5
    assert str(root / "test" / "ant" / "h.png") in d.test.files and str(root / "test" / "bee" / "0.png") in d.test.files
    bee = [(f, int(y)) for part in (d.train, d.val) for f, y in part.samples if "bee" in f]
    assert sorted(bee) == [(str(root / "train" / "bee" / f"{i}.png"), 1) for i in range(4)]
    assert d.describe()["repeated_files"] == 7 and data_identity(cfg, d)["resolved"]["repeats"] == 7
    assert len(said) == 1 and said[0].startswith(f"image folder {root}: 7 path(s) reach an image already counted")
    assert "train/ant/0.png is test/ant/h.png" in said[0]


def test_identical_images_in_two_splits_are_named_and_reported(tmp_path, monkeypatch):
    """Copies (same bytes, separate files) that the seeded split puts in two splits are kept, named in
    a warning, counted in the data's description and stated by the report."""
    import shutil

    from compress.data import data_identity
    from compress.report import data_notes

    root = tmp_path / "imgs"
    _write_pngs(root, classes=("sea", "sky"), per_class=6)
    for i in range(1, 6):
        shutil.copy(root / "sky" / "0.png", root / "sky" / f"{i}.png")
    said = _warnings_of_data(monkeypatch)
    cfg = DataConfig(dataset=f"imagefolder:{root}", image_size=16, workers=0)
    d = load_data(cfg)
    assert len(d.train) + len(d.val) + len(d.test) == 12
    held_out = [f for part in (d.val, d.test) for f in part.files if "/sky/" in f]
    described = d.describe()
    assert described["identical_across_splits"] == len(held_out) == 3 and described["repeated_files"] == 0
    first = described["identical_examples"][0]
    assert first[0].startswith("sky/") and first[1].startswith("sky/")
    assert len(said) == 1 and said[0].startswith(f"image folder {root}: 3 image(s) of the val/test splits have the "
                                                 f"same bytes as an image of an earlier split; kept: ")
    assert f"{first[0]} = {first[1]}" in said[0]
    assert any(n.startswith("3 image(s) of the val/test splits have the same bytes") for n in data_notes(described))
    assert not {"loops", "repeats"} & set(data_identity(cfg, d)["resolved"])  # a folder without repeats: as before
