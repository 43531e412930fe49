"""Keypoints: sampling a field at points and the target registration error (TRE).

Keypoints are voxel coordinates ``(B, N, ndim)`` (or ``(N, ndim)`` for one pair), coordinate
``k`` along spatial axis ``k``, the same order as a flow's channels (:mod:`regkit.spatial`).
A flow ``u`` on the fixed grid maps a fixed point ``p`` to ``p + u(p)`` in the moving image, so
a fixed keypoint displaced by the flow should land on its moving keypoint. That is how the
Learn2Reg evaluation scores keypoints and landmarks (``docs/learn2reg.md``).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from regkit.errors import InputError

Spacing = Union[None, Sequence[float], Tensor]


def as_point_batch(points, name: str, ndim: int, device=None, dtype=None) -> Tensor:
    """``(N, ndim)`` or ``(B, N, ndim)`` (tensor or array) -> ``(B, N, ndim)`` tensor."""
    p = torch.as_tensor(points, device=device)
    if dtype is not None:
        p = p.to(dtype)
    if p.dim() == 2:
        p = p.unsqueeze(0)
    if p.dim() != 3 or p.shape[-1] != ndim:
        raise InputError(f"{name}: expected keypoints (N, {ndim}) or (B, N, {ndim}) in voxels, got shape {tuple(p.shape)}")
    return p


def sample_points(field: Tensor, points: Tensor) -> Tensor:
    """Linear interpolation of ``field`` at voxel coordinates.

    Args:
        field: ``(B, C, *spatial)`` (e.g. a flow, C = ndim).
        points: ``(B, N, ndim)`` voxel coordinates, coordinate ``k`` along spatial axis ``k``
            (a batch of 1 field or of 1 point set broadcasts over the other).
    Returns:
        ``(B, N, C)``: bilinear/trilinear values (``grid_sample``, ``align_corners=True``, so a
        point on a voxel centre gets exactly that voxel's value); zeros beyond the border, as
        the Learn2Reg evaluation's ``map_coordinates(mode="constant")``. Half-precision fields
        are sampled in float32; differentiable in ``field``.
    """
    ndim = field.dim() - 2
    if ndim not in (2, 3):
        raise InputError(f"sample_points: field must be (B, C, *spatial) with 2 or 3 spatial dims, got {tuple(field.shape)}")
    points = as_point_batch(points, "sample_points", ndim)
    if points.shape[0] != field.shape[0] and 1 not in (points.shape[0], field.shape[0]):
        raise InputError(f"sample_points: {points.shape[0]} point sets for a batch of {field.shape[0]} fields")
    b = max(points.shape[0], field.shape[0])
    field = field.expand(b, *field.shape[1:])
    dtype = torch.float32 if field.dtype in (torch.float16, torch.bfloat16) else field.dtype
    shape = field.shape[2:]
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], device=field.device, dtype=dtype)
    grid = (points.to(device=field.device, dtype=dtype) * scale - 1.0).flip(-1)  # grid_sample wants (x=last axis, ...)
    grid = grid.expand(field.shape[0], -1, -1).reshape(field.shape[0], -1, *([1] * (ndim - 1)), ndim)
    with torch.autocast(field.device.type, enabled=False):
        out = F.grid_sample(field.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(field.shape[0], field.shape[1], -1).transpose(1, 2)


def spacing_tensor(spacing: Spacing, batch: int, ndim: int, device, dtype) -> Tensor:
    """Voxel size in mm as ``(B or 1, 1, ndim)``; ``None`` means 1 mm (voxel units)."""
    if spacing is None:
        return torch.ones(1, 1, ndim, device=device, dtype=dtype)
    s = torch.as_tensor(spacing, device=device, dtype=dtype)
    if s.dim() == 1:
        s = s.unsqueeze(0)
    if s.dim() != 2 or s.shape[-1] != ndim or s.shape[0] not in (1, batch) or not bool((s > 0).all()):
        raise InputError(f"spacing must be {ndim} positive voxel sizes in mm (or one row per pair), got {s.tolist()}")
    return s.unsqueeze(1)


def keypoint_distances(flow: Tensor, fixed_kp, moving_kp, spacing: Spacing = None) -> Tensor:
    """Per-keypoint registration error ``|| (p + u(p) - q) * spacing ||``, ``(B, N)``.

    Args:
        flow: ``(B, ndim, *spatial)`` displacement in voxels on the fixed grid.
        fixed_kp, moving_kp: ``(B, N, ndim)`` or ``(N, ndim)`` corresponding voxel coordinates
            ``p`` (fixed image) and ``q`` (moving image).
        spacing: voxel size in mm ``(ndim,)`` or ``(B, ndim)``; ``None`` gives voxel units.
            The Learn2Reg evaluation multiplies by the **moving** image's spacing (the residual
            lies in the moving image); for its tasks both images share one spacing.
    Returns:
        ``(B, N)`` distances in mm, in the flow's dtype (float32 for half-precision flows).
    """
    ndim = flow.dim() - 2
    dtype = torch.float32 if flow.dtype in (torch.float16, torch.bfloat16) else flow.dtype
    p = as_point_batch(fixed_kp, "fixed keypoints", ndim, flow.device, dtype)
    q = as_point_batch(moving_kp, "moving keypoints", ndim, flow.device, dtype)
    if p.shape[1] != q.shape[1]:
        raise InputError(f"fixed and moving keypoints must correspond one to one, got {p.shape[1]} and {q.shape[1]} points")
    residual = p + sample_points(flow, p) - q
    return (residual * spacing_tensor(spacing, residual.shape[0], ndim, flow.device, dtype)).norm(dim=-1)
