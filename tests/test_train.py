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
