"""Distillation losses, registered by name. Each takes student logits, targets and (when it
``needs_teacher``) the teacher's logits for the same batch."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError


class DistillLoss(nn.Module):
    """Base: ``forward(student_logits, targets, teacher_logits=None) -> scalar``."""

    description = ""

    @property
    def needs_teacher(self) -> bool:
        return True


LOSSES: dict[str, tuple[type[DistillLoss], str]] = {}


def register(name: str) -> Callable[[type[DistillLoss]], type[DistillLoss]]:
    def deco(cls: type[DistillLoss]) -> type[DistillLoss]:
        LOSSES[name] = (cls, (cls.__doc__ or "").strip().splitlines()[0])
        return cls

    return deco


@register("kd")
class HintonKD(DistillLoss):
    """Hinton KD: soft targets of the teacher at temperature T blended with the hard labels.

    L = (1 − α)·CE(y, s) + α·T²·KL(σ(t/T) ‖ σ(s/T))

    Equation (1) of the knowledge-distillation review; Hinton, Vinyals and Dean, "Distilling the
    Knowledge in a Neural Network", 2015. ``s``, ``t`` are student and teacher logits, σ the softmax;
    the T² factor keeps the soft-target gradients on the scale of the hard-label ones. The KL is
    summed over classes and averaged over the batch. α = 0 is plain cross-entropy (the from-scratch
    baseline) and needs no teacher.
    """

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0, label_smoothing: float = 0.0):
        super().__init__()
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
        ce = F.cross_entropy(student_logits, targets, label_smoothing=self.label_smoothing)
        if self.alpha == 0:
            return ce
        if teacher_logits is None:
            raise ValueError("kd with alpha > 0 needs teacher logits")
        t = self.temperature
        kl = F.kl_div(
            F.log_softmax(student_logits / t, dim=1),
            F.log_softmax(teacher_logits / t, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        return (1.0 - self.alpha) * ce + self.alpha * t * t * kl


def build_loss(name: str, **kwargs) -> DistillLoss:
    if name not in LOSSES:
        raise CompressError(f"unknown distillation loss {name!r}; valid: {', '.join(LOSSES)}")
    return LOSSES[name][0](**kwargs)
