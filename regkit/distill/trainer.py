"""Adversarial distillation of a student network from a frozen teacher (ALDK).

``python train.py experiment=distill teacher.ckpt=<teacher checkpoint> model=student``

Each step: the frozen teacher gives ``phi_t``; the student gives ``phi_s``; the discriminator takes
``d_steps`` steps on ``L_D = -gap + lam * GP`` (``phi_s`` detached); then the student takes one
step on ``L_adv = gamma * l_rec + (1 - gamma) * l_dis`` with the discriminator frozen. ``l_rec`` is
the configured training loss (``loss=...``, e.g. ``ncc`` = 1 - Pearson correlation as in the paper,
optionally with smoothness terms). See ``regkit.distill.losses`` for the formulas.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Mapping

import torch
from torch import nn

from regkit import distributed
from regkit.distill.losses import discrimination_terms
from regkit.errors import InputError
from regkit.losses.composite import LossOutput
from regkit.checkpoint import load_model
from regkit.training.trainer import Trainer

log = logging.getLogger("regkit")


class DistillationTrainer(Trainer):
    """:class:`Trainer` whose step distils ``model`` (the student) from a teacher checkpoint.

    Args:
        teacher_ckpt: a regkit checkpoint (any model); loaded through the registry and frozen.
        discriminator: a :class:`~regkit.distill.FlowDiscriminator` (or any ``flow -> (B, 1)`` module).
        d_optimizer: a partial optimizer for the discriminator's parameters.
        beta, gamma, lam: ALDK's mixing, loss-balance and penalty weights (code defaults 0.1, 0.3, 0.1).
        d_steps: discriminator steps per student step (the update ratio).
        flow_weight: weight of a direct flow-matching term ``mean((phi_s - phi_t)²)`` (voxels²)
            added to ``L_adv``; 0 (default) is the paper's loss. Plain knowledge distillation,
            for comparison and for data where the adversarial term alone does not help.
        penalty_to_student: let the gradient penalty in the student's ``l_dis`` pass a gradient
            to the student (double back-propagation through ``phi_hat``). Off by default: the
            penalty then regularises the discriminator only, as in WGAN-GP (see
            ``regkit.distill.losses`` and the measurement in docs/distillation.md).
        **kwargs: :class:`Trainer` options.
    """

    def __init__(self, teacher_ckpt: str, discriminator: nn.Module, d_optimizer: Callable[..., torch.optim.Optimizer],
                 beta: float = 0.1, gamma: float = 0.3, lam: float = 0.1, d_steps: int = 1,
                 flow_weight: float = 0.0, penalty_to_student: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, value in (("beta", beta), ("gamma", gamma)):
            if not 0.0 <= value <= 1.0:
                raise InputError(f"distillation: {name} must be in [0, 1], got {value}")
        if lam < 0:
            raise InputError(f"distillation: lam must be >= 0, got {lam}")
        if flow_weight < 0:
            raise InputError(f"distillation: flow_weight must be >= 0, got {flow_weight}")
        if d_steps < 0:
            raise InputError(f"distillation: d_steps must be >= 0, got {d_steps}")
        self.teacher_ckpt = str(teacher_ckpt)
        self.teacher = load_model(self.teacher_ckpt).eval().requires_grad_(False)
        self.teacher_name = self.teacher.regkit_spec["name"]  # rebuilt through the registry
        self.discriminator = discriminator
        self.d_optimizer = d_optimizer(self.discriminator.parameters())
        self.beta, self.gamma, self.lam, self.d_steps = float(beta), float(gamma), float(lam), int(d_steps)
        self.penalty_to_student = bool(penalty_to_student)
        self.flow_weight = float(flow_weight)

    def fit(self, model: nn.Module, *args: Any, **kwargs: Any) -> Dict[str, float]:
        if distributed.env_world_size() > 1:
            # The discriminator's updates are not synchronised across ranks.
            raise InputError("experiment=distill runs in one process; launch it without torchrun "
                             f"(WORLD_SIZE={distributed.env_world_size()})")
        self.teacher.to(self.device)
        self.discriminator.to(self.device)
        log.info("distilling %s (%s parameters) from teacher %s (%s parameters, %s)", type(model).__name__,
                 f"{sum(p.numel() for p in model.parameters()):,}", self.teacher_name,
                 f"{sum(p.numel() for p in self.teacher.parameters()):,}", self.teacher_ckpt)
        return super().fit(model, *args, **kwargs)

    def training_step(self, batch: Mapping[str, Any]) -> LossOutput:
        moving, fixed = batch["moving"], batch["fixed"]
        with self.timer.phase("forward"):
            with torch.no_grad(), self.autocast():
                phi_t = self.teacher(moving, fixed).flow.float()
            output = self.forward(moving, fixed)
        if phi_t.shape != output.flow.shape:
            raise InputError(f"teacher flow {tuple(phi_t.shape)} and student flow {tuple(output.flow.shape)} differ")
        with self.timer.phase("discriminator"):
            self.discriminator.requires_grad_(True)
            for _ in range(self.d_steps):
                d_terms = discrimination_terms(self.discriminator, output.flow.detach(), phi_t, self.beta)
                d_loss = -d_terms.gap + self.lam * d_terms.penalty
                self.d_optimizer.zero_grad(set_to_none=True)
                d_loss.backward()
                self.d_optimizer.step()
            self.discriminator.requires_grad_(False)  # the student step must not move D
        with self.timer.phase("loss"):
            rec = self.loss_fn(output, batch)
            terms = discrimination_terms(self.discriminator, output.flow, phi_t, self.beta, self.penalty_to_student)
            l_dis = terms.l_dis(self.lam)
            total = self.gamma * rec.total + (1.0 - self.gamma) * l_dis
            flow_match = (output.flow - phi_t).pow(2).mean()
            if self.flow_weight:
                total = total + self.flow_weight * flow_match
        losses = LossOutput(total=total, terms={**rec.terms, "rec": rec.total, "l_dis": l_dis, "dis_gap": terms.gap,
                                                "dis_penalty": terms.penalty, "D_student": terms.d_student,
                                                "D_teacher": terms.d_teacher, "flow_match": flow_match.detach()})
        self._check_finite(losses)
        self.backward_and_step(total)
        return losses

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["distill"] = {"discriminator": self.discriminator.state_dict(),
                            "d_optimizer": self.d_optimizer.state_dict(), "teacher_ckpt": self.teacher_ckpt}
        return state

    def load_extra_state(self, data: Dict[str, Any]) -> None:
        extra = data.get("distill")
        if extra:
            self.discriminator.load_state_dict(extra["discriminator"])
            self.d_optimizer.load_state_dict(extra["d_optimizer"])
