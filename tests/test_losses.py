import math

import pytest
import torch

from compress.distill import LOSSES, HintonKD, build_loss
from compress.errors import CompressError


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def test_kd_matches_equation_1_by_hand():
    # two images, three classes: computed here with plain Python, term by term
    s = [[1.0, 2.0, 0.5], [0.2, -1.0, 3.0]]
    t = [[0.5, 3.0, -1.0], [1.0, 0.0, 2.0]]
    y = [1, 2]
    alpha, T = 0.7, 2.0
    ce = sum(-math.log(_softmax(s[i])[y[i]]) for i in range(2)) / 2
    kl = 0.0
    for i in range(2):
        pt, ps = _softmax([v / T for v in t[i]]), _softmax([v / T for v in s[i]])
        kl += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    kl /= 2
    expected = (1 - alpha) * ce + alpha * T * T * kl
    got = HintonKD(alpha=alpha, temperature=T)(torch.tensor(s), torch.tensor(y), torch.tensor(t))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_alpha_zero_is_cross_entropy_without_teacher():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    loss = HintonKD(alpha=0.0)
    assert not loss.needs_teacher
    assert loss(s, torch.tensor([0])).item() == pytest.approx(-math.log(_softmax([1.0, 2.0, 0.5])[0]), rel=1e-6)


def test_identical_logits_leave_only_the_hard_label_term():
    s = torch.tensor([[0.3, -0.2, 1.1]])
    loss = HintonKD(alpha=1.0, temperature=3.0)
    assert loss(s, torch.tensor([2]), s.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_registry_and_bad_values():
    assert "kd" in LOSSES
    with pytest.raises(CompressError, match="unknown distillation loss 'nope'; valid: kd"):
        build_loss("nope")
    with pytest.raises(CompressError, match="alpha"):
        HintonKD(alpha=2.0)
    with pytest.raises(CompressError, match="temperature"):
        HintonKD(temperature=0.0)
