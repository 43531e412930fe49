"""Adversarial distillation of a light-weight student from a frozen teacher (ALDK).

``python train.py experiment=distill teacher.ckpt=<checkpoint>``; see ``docs/distillation.md``.
"""
from regkit.distill.discriminator import FlowDiscriminator
from regkit.distill.losses import DiscriminationTerms, discrimination_terms, gradient_penalty
from regkit.distill.trainer import DistillationTrainer

__all__ = ["FlowDiscriminator", "DiscriminationTerms", "discrimination_terms", "gradient_penalty",
           "DistillationTrainer"]
