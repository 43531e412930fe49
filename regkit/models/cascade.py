"""Recursive cascades of any registration model.

Paper: S. Zhao, Y. Dong, E. I-C. Chang, Y. Xu, "Recursive Cascaded Networks for Unsupervised
Medical Image Registration", ICCV 2019; used as the teacher of the light-weight-student work
(LDR_ALDK). Source read for facts: github.com/microsoft/Recursive-Cascaded-Networks and
github.com/aioz-ai/LDR_ALDK (``agg_flow = warp(prev_agg_flow, flow) + flow``).

Stage k registers the previous stage's warped image to the fixed image; its flow is composed
with the flows so far, and the ORIGINAL moving image is warped once by the composed flow (so
interpolation blur does not accumulate). ``model.cascades=n`` builds n stages of any registered
model, each with its own weights.
"""
from __future__ import annotations

from typing import List, Sequence

from torch import Tensor, nn

from regkit.errors import InputError
from regkit.models.base import RegistrationModel, RegistrationOutput
from regkit.spatial import compose_flows


class Cascade(RegistrationModel):
    """``n`` stages applied recursively; returns the composed flow and every stage's field.

    Args:
        stages: the stage models (separate weights), all of the same ndim and channels.
    Output: ``flow`` is the composition (first stage applied first), ``warped`` the moving image
    warped once by it, ``stage_fields`` each stage's field (the velocity for diffeomorphic stages),
    which smoothness terms regularise one by one.
    """

    def __init__(self, stages: Sequence[RegistrationModel]) -> None:
        stages = list(stages)
        if len(stages) < 1:
            raise InputError("Cascade needs at least one stage")
        first = stages[0]
        for s in stages[1:]:
            if (s.ndim, s.in_channels) != (first.ndim, first.in_channels):
                raise InputError("Cascade stages must share ndim and in_channels")
        super().__init__(ndim=first.ndim, in_channels=first.in_channels, transformer=first.transformer)
        self.stages = nn.ModuleList(stages)
        self.min_size = max(s.min_size for s in stages)

    def forward(self, moving: Tensor, fixed: Tensor) -> RegistrationOutput:
        self.check_inputs(moving, fixed)
        warped, flow = moving, None
        fields: List[Tensor] = []
        for stage in self.stages:
            out = stage(warped, fixed)
            fields.append(out.field)
            flow = out.flow if flow is None else compose_flows(flow, out.flow)
            warped = self.transformer(moving, flow)
        return RegistrationOutput(warped=warped, flow=flow, velocity=None, stage_fields=fields)
