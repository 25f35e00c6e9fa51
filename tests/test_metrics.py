import math

import pytest
import torch
from torch import nn

from compress import metrics as M


def test_relative_error_and_distillation_factor():
    assert M.relative_error(0.96, 0.98) == pytest.approx(0.04 / 0.02)
    assert M.relative_error(0.9, 1.0) is None
    assert M.distillation_factor(11_000_000, 2_200_000) == pytest.approx(5.0)


def test_kl_and_correlation_by_hand():
    t = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]], dtype=torch.float64))
    s = torch.log(torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.8, 0.1]], dtype=torch.float64))
    kl = (0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5) + 0.0) / 2
    assert M.kl_divergence(t, s) == pytest.approx(kl, rel=1e-9)
    pt = [0.5, 0.25, 0.25, 0.1, 0.8, 0.1]
    ps = [0.25, 0.5, 0.25, 0.1, 0.8, 0.1]
    mt, ms = sum(pt) / 6, sum(ps) / 6
    cov = sum((a - mt) * (b - ms) for a, b in zip(pt, ps))
    rho = cov / math.sqrt(sum((a - mt) ** 2 for a in pt) * sum((b - ms) ** 2 for b in ps))
    assert M.correlation(t, s) == pytest.approx(rho, rel=1e-9)
    assert M.correlation(t, t) == pytest.approx(1.0)
    assert M.kl_divergence(t, t) == pytest.approx(0.0, abs=1e-12)


def test_review_metrics_bundle():
    targets = torch.tensor([0, 1, 1, 0])
    t = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [0.0, 2.0]])  # 3/4 right
    s = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])  # 2/4 right
    m = M.review_metrics(t, s, targets, teacher_params=100, student_params=25)
    assert m["accuracy"] == 0.5 and m["teacher_accuracy"] == 0.75
    assert m["relative_error"] == pytest.approx(0.5 / 0.25)
    assert m["distillation_factor"] == 4.0


def test_macs_count_convolutions_and_linear():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    # 8x8 output: regular conv 8*3*9 per pixel, depthwise 8*9 per pixel, linear 8*10
    expected = 64 * 8 * 3 * 9 + 64 * 8 * 9 + 80
    assert M.count_macs(net, 8) == expected
    # weights and biases: conv 8*3*9 + 8, depthwise 8*9 + 8, linear 8*10 + 10
    assert M.count_params(net) == (216 + 8) + (72 + 8) + (80 + 10)
    # a module used twice holds its parameters once
    shared = nn.Linear(4, 4)
    assert M.count_params(nn.Sequential(shared, nn.ReLU(), shared)) == 16 + 4
