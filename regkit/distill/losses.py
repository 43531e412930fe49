"""The adversarial-distillation terms of ALDK (see ``discriminator.py`` for the paper).

With student flow ``phi_s``, teacher flow ``phi_t`` and discriminator ``D``:

    l_dis = || D(phi_s) - D(phi_t) ||² + lam * (|| grad_{phi_hat} D(phi_hat) ||_2 - 1)²,
    phi_hat = beta * phi_t + (1 - beta) * phi_s,
    L_adv = gamma * l_rec + (1 - gamma) * l_dis,

``|| . ||²`` averaged over the batch, the gradient norm taken per sample over all flow voxels and
channels. As released, the TensorFlow code evaluates this term through a non-differentiable op and
never updates ``D``; here both players get real gradients:

* the discriminator ascends the gap and keeps its gradient norm near 1 at ``phi_hat`` (a
  WGAN-GP-style critic): ``L_D = -|| D(phi_s) - D(phi_t) ||² + lam * GP`` with ``phi_s`` detached;
* the student descends ``L_adv``; its gradient reaches the student through ``D(phi_s)``. The
  penalty is in the student's ``l_dis`` (its value is the formula's), but by default it does not
  pass a gradient to the student, as in WGAN-GP, where it regularises the critic only
  (``penalty_to_student=True`` passes it, by double back-propagation through ``phi_hat``: the
  formula read literally; measured on the embedded data it stalls the student, docs/distillation.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


def gradient_penalty(disc: nn.Module, phi_hat: Tensor) -> Tensor:
    """``mean_b (|| dD/dphi_hat ||_2 - 1)²``, differentiable (create_graph) for double backward."""
    if not phi_hat.requires_grad:
        phi_hat = phi_hat.detach().requires_grad_(True)
    out = disc(phi_hat)
    (grads,) = torch.autograd.grad(out.sum(), phi_hat, create_graph=True)
    norms = grads.flatten(1).norm(dim=1)
    return ((norms - 1.0) ** 2).mean()


@dataclass
class DiscriminationTerms:
    gap: Tensor          # || D(phi_s) - D(phi_t) ||², batch mean
    penalty: Tensor      # (|| grad D(phi_hat) || - 1)², batch mean
    d_student: Tensor    # mean D(phi_s)
    d_teacher: Tensor    # mean D(phi_t)

    def l_dis(self, lam: float) -> Tensor:
        return self.gap + lam * self.penalty


def discrimination_terms(disc: nn.Module, phi_s: Tensor, phi_t: Tensor, beta: float,
                         penalty_to_student: bool = True) -> DiscriminationTerms:
    """The terms of ``l_dis``; ``penalty_to_student=False`` evaluates the penalty at a detached
    ``phi_hat`` (same value, no gradient to ``phi_s``)."""
    d_s, d_t = disc(phi_s), disc(phi_t)
    phi_hat = beta * phi_t + (1.0 - beta) * phi_s
    if not penalty_to_student:
        phi_hat = phi_hat.detach()
    return DiscriminationTerms(gap=((d_s - d_t) ** 2).sum(1).mean(), penalty=gradient_penalty(disc, phi_hat),
                               d_student=d_s.detach().mean(), d_teacher=d_t.detach().mean())
