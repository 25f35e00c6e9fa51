import pytest
import torch

from compress.config import DataConfig, TrainConfig
from compress.data import load_data
from compress.distill import HintonKD
from compress.models import create_model
from compress.train import fit, lr_at, predict


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def digits16():
    return load_data(DataConfig(image_size=16))


def _train(data, work, epochs=3, on_epoch_end=None, teacher=None, alpha=0.0):
    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_050", data.num_classes)
    cfg = TrainConfig(epochs=epochs, lr=0.05)
    fit(model, data.train, data.val, cfg, HintonKD(alpha=alpha), work, seed=0, batch_size=128,
        teacher=teacher, on_epoch_end=on_epoch_end)
    return model


def test_killed_run_resumes_to_the_same_weights(digits16, tmp_path):
    straight = _train(digits16, tmp_path / "a")

    def stop(epoch, row):
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        _train(digits16, tmp_path / "b", on_epoch_end=stop)
    resumed = _train(digits16, tmp_path / "b")
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_kd_training_learns_and_is_reproducible(digits16, tmp_path):
    torch.manual_seed(1)
    teacher = create_model("mobilenetv3_small_050", digits16.num_classes).eval()
    a = _train(digits16, tmp_path / "a", epochs=2, teacher=teacher, alpha=0.5)
    b = _train(digits16, tmp_path / "b", epochs=2, teacher=teacher, alpha=0.5)
    la, y = predict(a, digits16.test)
    lb, _ = predict(b, digits16.test)
    assert torch.equal(la, lb)
    assert (la.argmax(1) == y).float().mean() > 0.2  # well above the 10% of chance after 2 epochs


def test_lr_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(epochs=10, lr=0.1, warmup_epochs=2)
    assert lr_at(cfg, 0, 0, 10) == pytest.approx(0.1 * 0.1 / 2)
    assert lr_at(cfg, 2, 0, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 9, 9, 10) < 0.001
    assert lr_at(cfg, 5, 0, 10) < lr_at(cfg, 3, 0, 10)
