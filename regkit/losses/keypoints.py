"""Keypoint supervision: distance between displaced fixed keypoints and moving keypoints (``keypoints``).

Called ``loss(flow, fixed_kp, moving_kp, mask=None, spacing=None)``; inside a
:class:`~regkit.losses.CompositeLoss` the arguments come from the batch that
:class:`regkit.data.Learn2RegData` builds when its dataset JSON lists keypoint files
(``fixed_keypoints``, ``moving_keypoints``, ``keypoints_mask``, ``moving_spacing``) and the
flow is the model's displacement ``output.flow``. The residual of keypoint ``i`` is
``r_i = (p_i + u(p_i) - q_i) * spacing`` in mm, with ``u(p_i)`` interpolated linearly
(:func:`regkit.keypoints.keypoint_distances`), the quantity the TRE metric averages.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from regkit.errors import check_choice
from regkit.keypoints import keypoint_distances
from regkit.losses.registry import LOSSES

PENALTIES = ("distance", "squared")


@LOSSES.register(name="keypoints")
class KeypointLoss(nn.Module):
    """Mean keypoint error over the valid keypoints of the batch.

    * ``distance`` (default): mean of ``||r_i||`` in mm, the TRE itself. Its gradient has unit
      length per keypoint, so far and near points pull equally (robust to a few wrong
      correspondences); at ``r_i = 0`` the subgradient 0 is used.
    * ``squared``: mean of ``||r_i||²`` in mm², the MSE of the Learn2Reg NLST example;
      large errors dominate.

    Args:
        penalty: ``distance`` or ``squared``.
    """

    inputs = "keypoints"

    def __init__(self, penalty: str = "distance") -> None:
        super().__init__()
        self.penalty = check_choice("keypoints penalty", penalty, PENALTIES)

    def forward(self, flow: Tensor, fixed_kp: Tensor, moving_kp: Tensor, mask: Optional[Tensor] = None,
                spacing: Optional[Tensor] = None) -> Tensor:
        """``flow`` ``(B, ndim, *spatial)`` in voxels; keypoints ``(B, N, ndim)`` voxels; ``mask``
        ``(B, N)`` bool (None: all valid); ``spacing`` ``(ndim,)`` or ``(B, ndim)`` mm (None: 1 mm).
        Returns a scalar; 0 (with the graph kept) when no keypoint is valid."""
        d = keypoint_distances(flow, fixed_kp, moving_kp, spacing)
        if self.penalty == "squared":
            d = d * d
        if mask is None:
            return d.mean() if d.numel() else flow.sum() * 0.0
        valid = mask.to(device=d.device, dtype=torch.bool).expand_as(d)
        n = valid.sum()
        if int(n) == 0:
            return flow.sum() * 0.0
        # where(), not multiplication: a padded point's value must not reach the gradient
        return torch.where(valid, d, torch.zeros_like(d)).sum() / n

    def extra_repr(self) -> str:
        return f"penalty={self.penalty!r}"
