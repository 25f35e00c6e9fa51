"""Distillation: the methods' formulas (``losses``), feature taps (``taps``) and the registry of
methods (``methods``), each an objective the training loop minimizes."""

from compress.distill.losses import DistillLoss, HintonKD
from compress.distill.methods import METHODS, Objective, build_method, logit_objective, summary

__all__ = ["METHODS", "DistillLoss", "HintonKD", "Objective", "build_method", "logit_objective", "summary"]
