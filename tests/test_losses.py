"""Each method's loss against its formula, computed here term by term in plain Python on inputs small
enough to check by hand."""

import math

import pytest
import torch
from torch import nn

from compress.distill import HintonKD, build_method
from compress.distill import losses as L
from compress.errors import CompressError


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _ce(row, y):
    return -math.log(_softmax(row)[y])


def _huber(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


class Fixed(nn.Module):
    """A 'model' whose logits are given: the loss of a method of logits is then checkable by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.logits + 0 * self.w


S = [[1.0, 2.0, 0.5], [0.2, -1.0, 3.0]]
T1 = [[0.5, 3.0, -1.0], [1.0, 0.0, 2.0]]
T2 = [[2.0, 0.0, 0.0], [-1.0, 1.0, 1.5]]
Y = [1, 2]
X = torch.zeros(2, 3, 4, 4)


def _kd_by_hand(s, t, y, alpha, temp):
    ce = sum(_ce(s[i], y[i]) for i in range(2)) / 2
    kl = sum(_kl(_softmax([v / temp for v in t[i]]), _softmax([v / temp for v in s[i]])) for i in range(2)) / 2
    return (1 - alpha) * ce + alpha * temp * temp * kl


def _objective_loss(name, student, teachers, **kw):
    obj = build_method(name, kw.pop("params", None), **kw)
    obj.bind(student, teachers, image_size=4)
    loss, logits = obj(student, X, torch.tensor(Y))
    return loss.item()


def test_scratch_is_cross_entropy():
    expected = (_ce(S[0], 1) + _ce(S[1], 2)) / 2
    assert _objective_loss("scratch", Fixed(S), []) == pytest.approx(expected, rel=1e-6)


def test_kd_matches_equation_1_by_hand():
    expected = _kd_by_hand(S, T1, Y, 0.7, 2.0)
    got = HintonKD(alpha=0.7, temperature=2.0)(torch.tensor(S), torch.tensor(Y), torch.tensor(T1))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert _objective_loss("kd", Fixed(S), [Fixed(T1)], alpha=0.7, temperature=2.0) == pytest.approx(expected, rel=1e-6)


def test_alpha_zero_is_cross_entropy_without_teacher():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    loss = HintonKD(alpha=0.0)
    assert not loss.needs_teacher
    assert loss(s, torch.tensor([0])).item() == pytest.approx(-math.log(_softmax([1.0, 2.0, 0.5])[0]), rel=1e-6)


def test_dkd_target_and_non_target_terms_by_hand():
    a, b, temp = 1.5, 6.0, 2.0
    ce = tckd = nckd = 0.0
    for s, t, y in zip(S, T1, Y):
        ps, pt = _softmax([v / temp for v in s]), _softmax([v / temp for v in t])
        tckd += _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]]) / 2
        rest = [c for c in range(3) if c != y]
        nckd += _kl(_softmax([t[c] / temp for c in rest]), _softmax([s[c] / temp for c in rest])) / 2
        ce += _ce(s, y) / 2
    expected = ce + temp * temp * (a * tckd + b * nckd)
    got = _objective_loss("dkd", Fixed(S), [Fixed(T1)], params={"alpha": a, "beta": b, "temperature": temp})
    assert got == pytest.approx(expected, rel=1e-5)
    t_, n_ = L.dkd_terms(torch.tensor(S), torch.tensor(Y), torch.tensor(T1), temp)
    assert (t_.item(), n_.item()) == pytest.approx((tckd, nckd), rel=1e-5)


def test_dkd_warmup_ramps_the_kd_terms():
    obj = build_method("dkd", {"warmup_epochs": 4}).bind(Fixed(S), [Fixed(T1)], image_size=4)
    ce = (_ce(S[0], 1) + _ce(S[1], 2)) / 2
    full = build_method("dkd").bind(Fixed(S), [Fixed(T1)], image_size=4)(Fixed(S), X, torch.tensor(Y))[0].item()
    obj.set_epoch(0, 10)  # first epoch: a quarter of the KD terms
    assert obj(Fixed(S), X, torch.tensor(Y))[0].item() == pytest.approx(ce + 0.25 * (full - ce), rel=1e-5)


def _multi_teacher_by_hand(w, alpha, temp):
    ce = sum(_ce(S[i], Y[i]) for i in range(2)) / 2
    kl = 0.0
    for i in range(2):
        p1, p2 = _softmax([v / temp for v in T1[i]]), _softmax([v / temp for v in T2[i]])
        mix = [w[0] * a + w[1] * b for a, b in zip(p1, p2)]
        kl += _kl(mix, _softmax([v / temp for v in S[i]])) / 2
    return (1 - alpha) * ce + alpha * temp * temp * kl


def test_multi_teacher_averages_soft_targets_by_hand():
    alpha, temp = 0.8, 3.0
    weighted = _multi_teacher_by_hand((0.25, 0.75), alpha, temp)
    equal = _multi_teacher_by_hand((0.5, 0.5), alpha, temp)
    assert abs(weighted - equal) > 1e-3 * equal  # T1 and T2 disagree: the weights change the loss
    got = _objective_loss("multi_teacher", Fixed(S), [Fixed(T1), Fixed(T2)], alpha=alpha, temperature=temp,
                          params={"teachers": ["resnet34"], "weights": [1.0, 3.0]})
    assert got == pytest.approx(weighted, rel=1e-6)
    # equal weights by default
    got = _objective_loss("multi_teacher", Fixed(S), [Fixed(T1), Fixed(T2)], alpha=alpha, temperature=temp)
    assert got == pytest.approx(equal, rel=1e-6)


def test_teacher_assistant_distills_from_the_assistant_logits():
    # bound to its assistant (T2), the loss is eq. (1) with the assistant's logits, not the teacher's
    got = _objective_loss("ta", Fixed(S), [Fixed(T2)], alpha=0.5, temperature=2.0)
    assert got == pytest.approx(_kd_by_hand(S, T2, Y, 0.5, 2.0), rel=1e-6)
    assert got != pytest.approx(_kd_by_hand(S, T1, Y, 0.5, 2.0), rel=1e-3)


def test_hint_loss_is_mean_squared_error_by_hand():
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    b = torch.tensor([[[[0.0, 2.0], [5.0, 3.0]]]])
    assert L.hint_loss(a, b).item() == pytest.approx((1 + 0 + 4 + 1) / 4)


def test_attention_transfer_by_hand():
    # one image, two channels, 1×2 map: Q_i = mean_c F_c,i², then L2-normalized
    fs = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    ft = torch.tensor([[[[2.0, 1.0]], [[0.0, 1.0]]]])
    qs = [(1 + 9) / 2, (4 + 0) / 2]
    qt = [(4 + 0) / 2, (1 + 1) / 2]
    ns, nt = math.hypot(*qs), math.hypot(*qt)
    expected = sum((a / ns - b / nt) ** 2 for a, b in zip(qs, qt)) / 2
    assert L.at_loss([fs], [ft]).item() == pytest.approx(expected, rel=1e-6)


def test_rkd_distance_and_angle_by_hand():
    et = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]  # distances 3, 4, 5: mean 4
    es = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]  # distances 1, 1, √2
    def dist(p, q):
        return math.hypot(p[0] - q[0], p[1] - q[1])
    def psi_d(e):
        d = [[dist(e[i], e[j]) for j in range(3)] for i in range(3)]
        mu = sum(d[i][j] for i in range(3) for j in range(3) if i != j) / 6
        return [[d[i][j] / mu for j in range(3)] for i in range(3)]
    dt, ds = psi_d(et), psi_d(es)
    expected_d = sum(_huber(ds[i][j], dt[i][j]) for i in range(3) for j in range(3)) / 9
    def unit(p, q):
        v = [p[0] - q[0], p[1] - q[1]]
        n = math.hypot(*v)
        return [c / n for c in v] if n > 0 else [0.0, 0.0]
    def psi_a(e):
        out = []
        for j in range(3):
            for i in range(3):
                for k in range(3):
                    a, b = unit(e[i], e[j]), unit(e[k], e[j])
                    out.append(a[0] * b[0] + a[1] * b[1])
        return out
    expected_a = sum(_huber(a, b) for a, b in zip(psi_a(es), psi_a(et))) / 27
    tes, tet = torch.tensor(es), torch.tensor(et)
    assert L.rkd_distance_loss(tes, tet).item() == pytest.approx(expected_d, rel=1e-5)
    assert L.rkd_angle_loss(tes, tet).item() == pytest.approx(expected_a, rel=1e-5)


def test_similarity_preserving_by_hand():
    fs = [[1.0, 0.0], [1.0, 1.0]]
    ft = [[2.0, 0.0, 1.0], [0.0, 1.0, 0.0]]  # channel counts may differ
    def gram(q):
        g = [[sum(a * b for a, b in zip(q[i], q[j])) for j in range(2)] for i in range(2)]
        return [[v / math.hypot(*row) for v in row] for row in g]
    gs, gt = gram(fs), gram(ft)
    expected = sum((gt[i][j] - gs[i][j]) ** 2 for i in range(2) for j in range(2)) / 4
    got = L.sp_loss(torch.tensor(fs).view(2, 2, 1, 1), torch.tensor(ft).view(2, 3, 1, 1))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_dml_by_hand_and_peers_targets_are_fixed():
    z1, z2 = S, T1
    expected = 0.0
    for i in range(2):
        expected += (_ce(z1[i], Y[i]) + _kl(_softmax(z2[i]), _softmax(z1[i]))) / 2
        expected += (_ce(z2[i], Y[i]) + _kl(_softmax(z1[i]), _softmax(z2[i]))) / 2
    a, b = torch.tensor(z1, requires_grad=True), torch.tensor(z2, requires_grad=True)
    loss = L.dml_loss([a, b], torch.tensor(Y))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # peer 1's gradient is that of CE + KL(p2 ‖ p1) alone: (softmax(z1) − (onehot + p2)/2·2)/batch
    p1, p2 = torch.softmax(a.detach(), 1), torch.softmax(b.detach(), 1)
    onehot = torch.nn.functional.one_hot(torch.tensor(Y), 3).float()
    assert torch.allclose(a.grad, ((p1 - onehot) + (p1 - p2)) / 2, atol=1e-6)


def test_cs_kd_by_hand_and_partners_share_the_class():
    lam, temp = 1.0, 4.0
    partner = T2
    expected = sum(_ce(S[i], Y[i]) + lam * temp * temp * _kl(_softmax([v / temp for v in partner[i]]),
                                                            _softmax([v / temp for v in S[i]])) for i in range(2)) / 2
    got = L.cs_kd_loss(torch.tensor(S), torch.tensor(Y), torch.tensor(partner), lam, temp)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    from compress.data import ImageDataset

    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    images = torch.arange(9).float().view(9, 1, 1, 1).expand(9, 3, 4, 4).clone()
    obj = build_method("cs_kd").bind(Fixed(S), [], image_size=4, train_ds=ImageDataset(images, labels))
    y = torch.tensor([2, 0, 1, 1])
    xs = obj.partners(y)
    assert [int(labels[int(v)]) for v in xs[:, 0, 0, 0]] == y.tolist()


def test_registry_and_bad_values():
    from compress.distill import METHODS

    assert list(METHODS)[:2] == ["scratch", "kd"]
    with pytest.raises(CompressError, match="unknown distillation method 'nope'; valid: scratch, kd"):
        build_method("nope")
    with pytest.raises(ValueError, match=r"params.beta: .*\(method dkd\)"):
        build_method("dkd", {"beta": -1})
    with pytest.raises(ValueError, match="params.bogus: unknown key"):
        build_method("at", {"bogus": 1})
    with pytest.raises(CompressError, match="alpha"):
        HintonKD(alpha=2.0)
    with pytest.raises(CompressError, match="temperature"):
        HintonKD(temperature=0.0)
    with pytest.raises(CompressError, match="needs a teacher"):
        build_method("kd").bind(Fixed(S), [], image_size=4)


def _zscore(row):
    m = sum(row) / len(row)
    sd = math.sqrt(sum((v - m) ** 2 for v in row) / (len(row) - 1))
    return [(v - m) / sd for v in row]


def test_consistent_teaching_is_the_distillation_term_alone_by_hand():
    expected = _kd_by_hand(S, T1, Y, 1.0, 2.0)
    got = _objective_loss("consistent", Fixed(S), [Fixed(T1)], alpha=0.3, temperature=2.0)
    assert got == pytest.approx(expected, rel=1e-6)  # alpha is not used: no label term
    soft = torch.tensor([[0.0, 0.6, 0.4], [0.5, 0.0, 0.5]])  # mixup's targets do not enter either
    obj = build_method("consistent", temperature=2.0).bind(Fixed(S), [Fixed(T1)], image_size=4)
    assert obj(Fixed(S), X, soft)[0].item() == pytest.approx(expected, rel=1e-6)


def test_logit_standardization_by_hand():
    s_std, t_std = [_zscore(r) for r in S], [_zscore(r) for r in T1]
    expected = _kd_by_hand(s_std, t_std, Y, 1.0, 2.0)
    got = _objective_loss("consistent", Fixed(S), [Fixed(T1)], temperature=2.0, params={"standardize": True})
    assert got == pytest.approx(expected, rel=1e-4)
    ce = sum(_ce(S[i], Y[i]) for i in range(2)) / 2
    kd = _objective_loss("kd", Fixed(S), [Fixed(T1)], alpha=0.5, temperature=2.0, params={"standardize": True})
    assert kd == pytest.approx(0.5 * ce + 0.5 * expected, rel=1e-4)
    # the standardized loss ignores the teacher's scale and shift
    scaled = [[3 * v + 1 for v in r] for r in T1]
    again = _objective_loss("consistent", Fixed(S), [Fixed(scaled)], temperature=2.0, params={"standardize": True})
    assert again == pytest.approx(expected, rel=1e-4)


def test_soft_targets_cross_entropy_and_methods_that_need_hard_labels():
    soft = torch.tensor([[0.0, 0.7, 0.3], [0.2, 0.0, 0.8]])
    expected = sum(-sum(p * math.log(q) for p, q in zip(soft[i].tolist(), _softmax(S[i]))) for i in range(2)) / 2
    obj = build_method("scratch", label_smoothing=0.1).bind(Fixed(S), [], image_size=4)
    assert obj(Fixed(S), X, soft)[0].item() == pytest.approx(expected, rel=1e-6)  # smoothing is mixup's job then
    assert build_method("kd").soft_targets and not build_method("dkd").soft_targets
    assert not build_method("cs_kd").soft_targets
