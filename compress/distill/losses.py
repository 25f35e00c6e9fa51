"""The formulas of the distillation methods, as plain functions of tensors (no models, no hooks), so
each can be checked by hand on small inputs. ``compress.distill.methods`` wires them to models.

Conventions: ``s``/``t`` are student/teacher logits (batch, classes); KL terms are summed over classes
and averaged over the batch (``batchmean``); feature maps are (batch, channels, height, width)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError


def soft_kl(target_probs: torch.Tensor, s: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p ‖ σ(s/T)) for a given target distribution p, averaged over the batch."""
    log_q = F.log_softmax(s / temperature, dim=1)
    p = target_probs.clamp_min(1e-12)
    return (target_probs * (p.log() - log_q)).sum(1).mean()


def ce(s: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against class indices, or against soft targets (batch, classes) such as mixup's,
    which already carry their label smoothing."""
    if y.is_floating_point():
        return F.cross_entropy(s, y)
    return F.cross_entropy(s, y, label_smoothing=label_smoothing)


def standardize(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (Sun et al., CVPR 2024): z-score each sample's logits, (z − mean(z)) /
    std(z), so the student matches the shape of the teacher's logits rather than their scale."""
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + eps)


def kd_term(s: torch.Tensor, t: torch.Tensor, temperature: float, standardized: bool = False) -> torch.Tensor:
    """T²·KL(σ(t/T) ‖ σ(s/T)), on standardized logits when asked."""
    if standardized:
        s, t = standardize(s), standardize(t)
    kl = F.kl_div(F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1),
                  log_target=True, reduction="batchmean")
    return temperature * temperature * kl


def kd_loss(s: torch.Tensor, y: torch.Tensor, t: torch.Tensor, alpha: float, temperature: float,
            label_smoothing: float = 0.0, standardized: bool = False) -> torch.Tensor:
    """Equation (1) of the review: (1 − α)·CE(y, s) + α·T²·KL(σ(t/T) ‖ σ(s/T))."""
    if alpha == 0:
        return ce(s, y, label_smoothing)
    kd = kd_term(s, t, temperature, standardized)
    if alpha == 1:
        return kd
    return (1.0 - alpha) * ce(s, y, label_smoothing) + alpha * kd


def multi_teacher_kd_loss(s: torch.Tensor, y: torch.Tensor, teachers: list[torch.Tensor], weights: list[float],
                          alpha: float, temperature: float, standardized: bool = False) -> torch.Tensor:
    """You et al. 2017: the soft targets of K teachers averaged with weights w_k (Σ w_k = 1),
    then equation (1): (1 − α)·CE + α·T²·KL(Σ_k w_k σ(t_k/T) ‖ σ(s/T))."""
    if standardized:
        teachers = [standardize(t) for t in teachers]
    p = sum(w * F.softmax(t / temperature, dim=1) for w, t in zip(weights, teachers))
    s_kd = standardize(s) if standardized else s
    return (1.0 - alpha) * ce(s, y) + alpha * temperature * temperature * soft_kl(p, s_kd, temperature)


def dkd_terms(s: torch.Tensor, y: torch.Tensor, t: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KD's two parts (Zhao et al., CVPR 2022), at temperature T:

    TCKD = KL(b^t ‖ b^s), b = [p_y, 1 − p_y] the binary target/non-target probabilities;
    NCKD = KL(p̂^t ‖ p̂^s), p̂ the softmax over the non-target classes only."""
    p_s, p_t = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
    gt = F.one_hot(y, s.shape[1]).bool()
    bs = torch.stack([p_s[gt], 1.0 - p_s[gt]], dim=1).clamp_min(1e-12)
    bt = torch.stack([p_t[gt], 1.0 - p_t[gt]], dim=1).clamp_min(1e-12)
    tckd = (bt * (bt.log() - bs.log())).sum(1).mean()
    masked_s = (s / temperature).masked_fill(gt, float("-inf"))
    masked_t = (t / temperature).masked_fill(gt, float("-inf"))
    log_hat_s = F.log_softmax(masked_s, dim=1).masked_fill(gt, 0.0)
    log_hat_t = F.log_softmax(masked_t, dim=1).masked_fill(gt, 0.0)
    nckd = (log_hat_t.exp() * (log_hat_t - log_hat_s)).sum(1).mean()
    return tckd, nckd


def dkd_loss(s: torch.Tensor, y: torch.Tensor, t: torch.Tensor, alpha: float, beta: float,
             temperature: float) -> torch.Tensor:
    """L = CE(y, s) + T²·(α·TCKD + β·NCKD)."""
    tckd, nckd = dkd_terms(s, y, t, temperature)
    return F.cross_entropy(s, y) + temperature * temperature * (alpha * tckd + beta * nckd)


def hint_loss(adapted_student: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNets hint (Romero et al. 2015): mean squared error between the regressor's output r(F_s) and
    the teacher's hint feature F_t, averaged over every element."""
    return F.mse_loss(adapted_student, teacher_feature)


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko and Komodakis 2017: Q = mean_c |F_c|^p, flattened and L2-normalized per image."""
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], p: float = 2.0) -> torch.Tensor:
    """Σ_j mean_{b,i} (Q_s^j − Q_t^j)², the attention-transfer term as in the authors' code (the
    recipe weight β/2 multiplies it). Maps of different sizes are average-pooled to the smaller."""
    total = torch.zeros((), device=student_feats[0].device)
    for fs, ft in zip(student_feats, teacher_feats):
        fs, ft = match_spatial(fs, ft)
        total = total + (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()
    return total


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two feature maps to the other's height and width."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    if a.shape[-1] > b.shape[-1]:
        return F.adaptive_avg_pool2d(a, b.shape[-2:]), b
    return a, F.adaptive_avg_pool2d(b, a.shape[-2:])


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    d2 = (e.unsqueeze(0) - e.unsqueeze(1)).pow(2).sum(-1)
    return d2.clamp_min(eps).sqrt() * (1.0 - torch.eye(len(e), device=e.device))


def rkd_distance_loss(es: torch.Tensor, et: torch.Tensor) -> torch.Tensor:
    """RKD-D (Park et al. 2019): ψ_D(x_i, x_j) = ‖x_i − x_j‖₂ / μ with μ the mean distance over the
    pairs i ≠ j of the batch; L = mean over the n×n matrix of Huber(ψ_D(t), ψ_D(s)) (δ = 1)."""
    with torch.no_grad():
        dt = pairwise_distances(et)
        dt = dt / dt[dt > 0].mean()
    ds = pairwise_distances(es)
    ds = ds / ds[ds > 0].mean()
    return F.smooth_l1_loss(ds, dt)


def angles(e: torch.Tensor) -> torch.Tensor:
    """ψ_A(x_i, x_j, x_k) = ⟨(x_i − x_j)/‖·‖, (x_k − x_j)/‖·‖⟩ for every triplet, flattened."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [j, i] = x_i - x_j
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_angle_loss(es: torch.Tensor, et: torch.Tensor) -> torch.Tensor:
    """RKD-A (Park et al. 2019): mean over all triplets of Huber(ψ_A(t), ψ_A(s))."""
    with torch.no_grad():
        at = angles(et)
    return F.smooth_l1_loss(angles(es), at)


def similarity_matrix(f: torch.Tensor) -> torch.Tensor:
    """Tung and Mori 2019: G = normalize_rows(Q·Qᵀ), Q the batch's activations flattened per image."""
    q = f.flatten(1)
    return F.normalize(q @ q.t(), p=2, dim=1)


def sp_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Similarity preserving: (1/b²)·‖G_t − G_s‖²_F."""
    b = fs.shape[0]
    return (similarity_matrix(ft) - similarity_matrix(fs)).pow(2).sum() / (b * b)


def dml_loss(logits: list[torch.Tensor], y: torch.Tensor, temperature: float = 1.0,
             kl_weight: float = 1.0) -> torch.Tensor:
    """Deep mutual learning (Zhang et al. 2018), all K peers at once:
    Σ_k [CE(y, z_k) + T²/(K−1)·Σ_{l≠k} KL(σ(z_l/T) ‖ σ(z_k/T))], the peers' targets z_l held fixed
    (each peer's gradient is that of its own loss in the paper). ``kl_weight`` scales the KL terms
    (the warm-up ramp)."""
    k = len(logits)
    total = torch.zeros((), device=y.device)
    for i, zi in enumerate(logits):
        total = total + F.cross_entropy(zi, y)
        for j, zj in enumerate(logits):
            if i != j:
                pj = F.softmax(zj.detach() / temperature, dim=1)
                total = total + kl_weight * temperature * temperature * soft_kl(pj, zi, temperature) / (k - 1)
    return total


def cs_kd_loss(s: torch.Tensor, y: torch.Tensor, s_partner: torch.Tensor, lam: float, temperature: float) -> torch.Tensor:
    """Class-wise self-KD (Yun et al. 2020): CE(y, f(x)) + λ·T²·KL(σ(f(x')/T) ‖ σ(f(x)/T)), x' another
    training image of the same class, its prediction held fixed."""
    p = F.softmax(s_partner.detach() / temperature, dim=1)
    return F.cross_entropy(s, y) + lam * temperature * temperature * soft_kl(p, s, temperature)


class DistillLoss(nn.Module):
    """A loss of (student logits, targets, teacher logits); the stages after distill fine-tune with it."""

    @property
    def needs_teacher(self) -> bool:
        return True


class HintonKD(DistillLoss):
    """Hinton KD: soft targets of the teacher at temperature T blended with the hard labels.

    L = (1 − α)·CE(y, s) + α·T²·KL(σ(t/T) ‖ σ(s/T))

    Equation (1) of the knowledge-distillation review; Hinton, Vinyals and Dean, "Distilling the
    Knowledge in a Neural Network", 2015. The T² factor keeps the soft-target gradients on the scale
    of the hard-label ones. α = 0 is plain cross-entropy (the from-scratch baseline) and needs no
    teacher."""

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0, label_smoothing: float = 0.0,
                 standardized: bool = False):
        super().__init__()
        self.standardized = standardized
        if not 0.0 <= alpha <= 1.0:
            raise CompressError(f"kd: alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise CompressError(f"kd: temperature must be > 0, got {temperature}")
        self.alpha, self.temperature, self.label_smoothing = alpha, temperature, label_smoothing

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0

    def forward(self, student_logits: torch.Tensor, targets: torch.Tensor,
                teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        if self.alpha > 0 and teacher_logits is None:
            raise ValueError("kd with alpha > 0 needs teacher logits")
        return kd_loss(student_logits, targets, teacher_logits, self.alpha, self.temperature, self.label_smoothing,
                       self.standardized)
