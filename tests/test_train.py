import pytest
import torch

from compress.data import DataConfig, load_data
from compress.distill import HintonKD, logit_objective
from compress.evaluate import predict
from compress.train import TrainConfig, fit, lr_at
from torch import nn


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def digits16():
    return load_data(DataConfig(image_size=16))


def small_cnn(num_classes=10):
    """The loop is model-agnostic; a small CNN with BatchNorm and dropout keeps these tests fast."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(32, num_classes),
    )


def _train(data, work, epochs=3, on_epoch_end=None, teacher=None, alpha=0.0):
    torch.manual_seed(0)
    model = small_cnn(data.num_classes)
    cfg = TrainConfig(epochs=epochs, lr=0.1, warmup_epochs=0)
    fit(model, data.train, data.val, cfg, logit_objective(HintonKD(alpha=alpha), model, teacher), work, seed=0,
        batch_size=32, on_epoch_end=on_epoch_end)
    return model


def test_killed_run_resumes_to_the_same_weights(digits16, tmp_path):
    straight = _train(digits16, tmp_path / "a")
    logits, y = predict(straight, digits16.test)
    assert (logits.argmax(1) == y).float().mean() > 0.5  # it learns: chance is 10%

    def stop(epoch, row):
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        _train(digits16, tmp_path / "b", on_epoch_end=stop)
    resumed = _train(digits16, tmp_path / "b")
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_kd_training_is_reproducible(digits16, tmp_path):
    torch.manual_seed(1)
    teacher = small_cnn(digits16.num_classes).eval()
    a = _train(digits16, tmp_path / "a", epochs=3, teacher=teacher, alpha=0.3)
    b = _train(digits16, tmp_path / "b", epochs=3, teacher=teacher, alpha=0.3)
    la, _ = predict(a, digits16.test)
    lb, _ = predict(b, digits16.test)
    assert torch.equal(la, lb)


def test_lr_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(epochs=10, lr=0.1, warmup_epochs=2)
    assert lr_at(cfg, 0, 0, 10) == pytest.approx(0.1 * 0.1 / 2)
    assert lr_at(cfg, 2, 0, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 9, 9, 10) < 0.001
    assert lr_at(cfg, 5, 0, 10) < lr_at(cfg, 3, 0, 10)


@pytest.fixture(scope="module")
def few(digits16):
    """A fifth of the digits: enough for the loop's selection logic, quick to train."""
    from types import SimpleNamespace

    from torch.utils.data import Subset

    return SimpleNamespace(train=Subset(digits16.train, range(0, len(digits16.train), 4)), val=digits16.val,
                           num_classes=digits16.num_classes)


def _fit_small(data, work, cfg, on_epoch_start=None, on_epoch_end=None):
    torch.manual_seed(0)
    model = small_cnn(data.num_classes)
    result = fit(model, data.train, data.val, cfg, logit_objective(HintonKD(alpha=0.0), model), work, seed=0,
                 batch_size=32, on_epoch_start=on_epoch_start, on_epoch_end=on_epoch_end)
    return model, result


def _val_acc(model, data):
    logits, y = predict(model, data.val)
    return float((logits.argmax(1) == y).float().mean())


def _fit_with_spoiled_last_epoch(data, work, select):
    """Four epochs; the weights are scrambled before the last one, so it scores worst."""
    def spoil(epoch):
        if epoch == 3:
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.randn_like(p) * 3)

    torch.manual_seed(0)
    model = small_cnn(data.num_classes)
    cfg = TrainConfig(epochs=4, lr=0.1, warmup_epochs=0, select=select)
    result = fit(model, data.train, data.val, cfg, logit_objective(HintonKD(alpha=0.0), model), work,
                 seed=0, batch_size=32, on_epoch_start=spoil)
    return model, result


def test_best_validation_epoch_is_kept_not_the_last(few, tmp_path):
    model, result = _fit_with_spoiled_last_epoch(few, tmp_path, "best")
    vals = [r["val_acc"] for r in result.history]
    assert vals[-1] < max(vals[:-1])  # the spoiled last epoch is worse
    assert result.selected_epoch == max(i + 1 for i, v in enumerate(vals) if v == max(vals))
    assert _val_acc(model, few) == pytest.approx(max(vals))  # the model leaves with the best weights


def test_select_last_keeps_the_last_epoch(few, tmp_path):
    model, result = _fit_with_spoiled_last_epoch(few, tmp_path, "last")
    assert result.selected_epoch == 4
    assert _val_acc(model, few) == pytest.approx(result.history[-1]["val_acc"])


def test_best_epoch_survives_a_resume(few, tmp_path):
    cfg = TrainConfig(epochs=4, lr=0.1, warmup_epochs=0, select="best")
    straight, r1 = _fit_small(few, tmp_path / "a", cfg)
    r2 = _killed_after_then_resumed_same(few, tmp_path / "b", cfg, 3, straight, r1)
    assert r2.resumed_from_epoch == 3


def _killed_after_then_resumed_same(data, work, cfg, epoch, straight, r1):
    """Kill a run after ``epoch``'s end-of-epoch hook, rerun it, and check it ends as the straight one."""
    def stop(e, row):
        if e == epoch:
            raise Interrupt

    with pytest.raises(Interrupt):
        _fit_small(data, work, cfg, on_epoch_end=stop)
    resumed, r2 = _fit_small(data, work, cfg)
    assert (r1.selected_epoch, r1.selected_val_acc) == (r2.selected_epoch, r2.selected_val_acc)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    return r2


def test_moving_average_is_validated_and_kept(few, tmp_path):
    plain, _ = _fit_small(few, tmp_path / "a", TrainConfig(epochs=3, lr=0.1, warmup_epochs=0, select="last"))
    ema, result = _fit_small(few, tmp_path / "b", TrainConfig(epochs=3, lr=0.1, warmup_epochs=0, select="last",
                                                                   ema_decay=0.99))
    assert result.ema and result.selected_epoch == 3
    assert _val_acc(ema, few) == pytest.approx(result.history[-1]["val_acc"])
    # the kept weights are the average, not the last step's
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ema.state_dict().values()))


def test_steps_become_epochs_for_the_data():
    from compress.config import QuantizeConfig
    from compress.train import resolve_schedule

    cfg = QuantizeConfig(epochs=4, steps=100, warmup_epochs=1, freeze_observers_after=2, freeze_bn_after=3)
    # 200 images in batches of 64: 3 steps an epoch (the short batch dropped) -> 34 epochs
    resolved, record = resolve_schedule(cfg, 200, 64)
    assert (resolved.epochs, resolved.steps) == (34, None)
    assert (resolved.warmup_epochs, resolved.freeze_observers_after, resolved.freeze_bn_after) == (8, 17, 26)
    assert record == {"steps": 100, "batches_per_epoch": 3, "epochs": 34, "warmup_epochs": 8,
                      "freeze_observers_after": 17, "freeze_bn_after": 26, "validated every": "7 epochs"}
    # 1600 images: 25 steps an epoch -> 4 epochs, the recipe's own shape
    resolved, _ = resolve_schedule(cfg, 1600, 64)
    assert (resolved.epochs, resolved.freeze_observers_after) == (4, 2)
    # one batch holds every image: one step an epoch
    assert resolve_schedule(cfg, 50, 64)[0].epochs == 100
    assert resolve_schedule(TrainConfig(epochs=7), 1600, 64) == (TrainConfig(epochs=7), None)


def test_channels_last_on_cpu_when_asked_and_in_the_fingerprint(digits16, tmp_path):
    """compute.channels_last: auto keeps a CPU training in NCHW (and its fingerprint as it was); true
    trains the student and its teacher in NHWC memory, says so in the fingerprint, and learns alike."""
    from compress import dist

    cpu = torch.device("cpu")
    assert not dist.hardware_plan(cpu, 32).channels_last and dist.effective("cpu", 32) == {}
    torch.manual_seed(1)
    teacher = small_cnn(digits16.num_classes).eval()
    try:
        dist.configure(channels_last=True)
        assert dist.hardware_plan(cpu, 32).channels_last and dist.effective("cpu", 32) == {"channels_last": True}
        model = _train(digits16, tmp_path / "nhwc", epochs=2, teacher=teacher, alpha=0.3)
    finally:
        dist.configure()
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert teacher[0].weight.is_contiguous(memory_format=torch.channels_last)
    reference = _train(digits16, tmp_path / "nchw", epochs=2, teacher=teacher, alpha=0.3)
    assert not reference[0].weight.is_contiguous(memory_format=torch.channels_last)
    nhwc, y = predict(model, digits16.test)
    nchw, _ = predict(reference, digits16.test)
    acc = lambda logits: (logits.argmax(1) == y).float().mean().item()  # noqa: E731
    assert acc(nhwc) > 0.5 and abs(acc(nhwc) - acc(nchw)) < 0.05


def test_validation_every_n_epochs_and_after_the_last_resumes_the_same(few, tmp_path):
    from compress.train import MAX_VALIDATIONS, resolve_schedule, validation_interval

    cfg = TrainConfig(epochs=5, lr=0.1, warmup_epochs=0, val_every=2)
    seen = []
    straight, r1 = _fit_small(few, tmp_path / "a", cfg, on_epoch_end=lambda e, row: seen.append(e))
    assert seen == [2, 4, 5] and [r["epoch"] for r in r1.history] == [2, 4, 5]
    assert r1.selected_epoch in (2, 4, 5)
    r2 = _killed_after_then_resumed_same(few, tmp_path / "b", cfg, 4, straight, r1)
    assert r2.resumed_from_epoch == 4 and [r["epoch"] for r in r2.history] == [2, 4, 5]
    # unset: every epoch on a short schedule; about MAX_VALIDATIONS times on a long one
    assert validation_interval(TrainConfig(epochs=MAX_VALIDATIONS)) == 1
    assert validation_interval(TrainConfig(epochs=667)) == 12
    long, derived = resolve_schedule(TrainConfig(steps=2000, epochs=50), train_images=200, batch_size=64)
    assert long.epochs == 667 and validation_interval(long) == 12 and derived["validated every"] == "12 epochs"
    # a schedule in steps: at most one validation every 20 steps (3 batches an epoch: every 7 epochs)
    short, derived = resolve_schedule(TrainConfig(steps=150, epochs=4), train_images=200, batch_size=64)
    assert short.epochs == 50 and validation_interval(short) == 7 and derived["validated every"] == "7 epochs"
    big, derived = resolve_schedule(TrainConfig(steps=150, epochs=4), train_images=2400, batch_size=64)
    assert validation_interval(big) == 1 and "validated every" not in derived
    assert "val_every" not in big.model_dump()  # a derived interval of 1 leaves the fingerprint as it was
    asked, _ = resolve_schedule(TrainConfig(steps=150, epochs=4, val_every=1), train_images=200, batch_size=64)
    assert validation_interval(asked) == 1
    assert "val_every" not in TrainConfig().model_dump()  # unset leaves stored fingerprints as they were


@pytest.mark.parametrize("damage", ["truncated", "another model", "no optimizer state"])
def test_a_checkpoint_that_cannot_be_resumed_from_is_named_and_training_starts_over(few, tmp_path, caplog, damage):
    """``last.pt`` cut short (a disk that filled, a copy that stopped), holding another model's weights,
    or weights that fit without the rest of the training state: one warning line names it, and the
    training runs from its first epoch and its own initial weights to the result of a run that found
    no checkpoint."""
    import logging

    from compress.train import CHECKPOINT

    cfg = TrainConfig(epochs=2, lr=0.1, warmup_epochs=0)
    straight, r1 = _fit_small(few, tmp_path / "straight", cfg)
    work = tmp_path / "damaged"
    work.mkdir()
    if damage == "truncated":
        whole = (tmp_path / "straight" / CHECKPOINT).read_bytes()
        (work / CHECKPOINT).write_bytes(whole[: len(whole) // 2])
    else:
        torch.manual_seed(7)
        other = small_cnn(5 if damage == "another model" else 10)
        torch.save({"model": other.state_dict(), "epoch": 1, "history": [], "optimizer": {}}, work / CHECKPOINT)
    with caplog.at_level(logging.INFO, logger="compress.train"):
        model, r2 = _fit_small(few, work, cfg)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "\n" not in warned[0], warned
    assert warned[0].startswith(f"train: checkpoint {work / CHECKPOINT} cannot be resumed from (")
    assert warned[0].endswith("); starting over")
    assert not any("resuming" in r.getMessage() for r in caplog.records)
    assert r2.resumed_from_epoch == 0 and r2.history == r1.history
    for (k, a), b in zip(straight.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.load(work / CHECKPOINT, weights_only=True)["epoch"] == 2  # the new run's own checkpoint
