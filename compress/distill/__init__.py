"""Distillation: a registry of losses, each a small ``nn.Module`` whose docstring carries its formula."""

from compress.distill.losses import LOSSES, DistillLoss, HintonKD, build_loss

__all__ = ["LOSSES", "DistillLoss", "HintonKD", "build_loss"]
