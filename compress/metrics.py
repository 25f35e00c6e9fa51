"""Accuracy, the review's evaluation metrics (eqs. 6-9), parameters and MACs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def accuracy(logits, targets) -> float:
    """Share of rows whose largest logit is the target; torch tensors or numpy arrays."""
    correct = int((logits.argmax(1) == targets).sum())
    return correct / len(targets) if len(targets) else float("nan")


def relative_error(student_acc: float, teacher_acc: float) -> float | None:
    """Eq. (6): E_s / E_t, error rates of student and teacher. ``None`` when the teacher makes no error."""
    e_s, e_t = 1.0 - student_acc, 1.0 - teacher_acc
    return None if e_t <= 0 else e_s / e_t


def distillation_factor(teacher_params: int, student_params: int) -> float:
    """Eq. (7): P_t / P_s, parameter counts of teacher and student."""
    return teacher_params / student_params


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Eq. (8): D_KL(P_t ‖ P_s) of the softmax outputs, summed over classes, averaged over images."""
    log_pt = F.log_softmax(teacher_logits.double(), dim=1)
    log_ps = F.log_softmax(student_logits.double(), dim=1)
    return float((log_pt.exp() * (log_pt - log_ps)).sum(1).mean())


def correlation(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Eq. (9): Pearson ρ(P_t, P_s) between the softmax outputs of teacher and student over every
    (image, class) pair of the split."""
    pt = F.softmax(teacher_logits.double(), dim=1).flatten()
    ps = F.softmax(student_logits.double(), dim=1).flatten()
    pt, ps = pt - pt.mean(), ps - ps.mean()
    denom = math.sqrt(float((pt * pt).sum()) * float((ps * ps).sum()))
    return float((pt * ps).sum()) / denom if denom > 0 else float("nan")


def review_metrics(teacher_logits: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor,
                   teacher_params: int, student_params: int) -> dict:
    """Every metric of eqs. (6)-(9), plus both accuracies, for one student against its teacher."""
    acc_t, acc_s = accuracy(teacher_logits, targets), accuracy(student_logits, targets)
    return {
        "accuracy": acc_s,
        "teacher_accuracy": acc_t,
        "relative_error": relative_error(acc_s, acc_t),
        "distillation_factor": distillation_factor(teacher_params, student_params),
        "kl_teacher_student": kl_divergence(teacher_logits, student_logits),
        "correlation": correlation(teacher_logits, student_logits),
    }


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, image_size: int, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (torch's FLOP counter counts 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops() // 2)
