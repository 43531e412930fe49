"""Multi-resolution pyramids of images and fields for the optimisation engine.

A level with factor ``f`` has ``max(min_size, round(n / f))`` voxels along an axis of ``n``
voxels. Grids of all levels span the same extent with the first and last voxel centres
kept (``align_corners=True``), the convention of :func:`regkit.spatial.resize_flow`, so that a
field optimised at one level is carried to the next by ``resize_flow`` without a shift.

Images are low-pass filtered before they are subsampled: a Gaussian with
``sigma = antialias · (f_eff - 1)`` voxels, ``f_eff = (n - 1) / (m - 1)`` the actual spacing
ratio of the axis (no filter at full resolution).
"""
from __future__ import annotations

from typing import List, Sequence

import torch.nn.functional as F
from torch import Tensor

from regkit.errors import InputError
from regkit.registration.smoothing import gaussian_smooth


def level_shape(shape: Sequence[int], factor: float, min_size: int = 8) -> List[int]:
    """Grid size of a pyramid level: ``round(n / factor)`` voxels, at least ``min(n, min_size)``."""
    if not factor >= 1:
        raise InputError(f"pyramid factors must be >= 1 (1 = full resolution), got {factor!r}")
    return [max(min(int(n), min_size), int(round(n / factor))) for n in shape]


def spacing_ratios(shape: Sequence[int], small: Sequence[int]) -> List[float]:
    """Voxel size of the ``small`` grid in voxels of ``shape`` along each axis."""
    return [(n - 1) / max(m - 1, 1) for n, m in zip(shape, small)]


def downsample(image: Tensor, size: Sequence[int], antialias: float = 0.5) -> Tensor:
    """Image ``(B, C, *spatial)`` resampled to ``size`` over the same extent (linear,
    ``align_corners=True``), Gaussian-filtered first (see the module docstring)."""
    size = [int(s) for s in size]
    if list(image.shape[2:]) == size:
        return image
    ratios = spacing_ratios(image.shape[2:], size)
    sigmas = [antialias * max(r - 1.0, 0.0) for r in ratios]
    if any(s > 0 for s in sigmas):
        image = gaussian_smooth(image, sigmas, padding="replicate")
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return F.interpolate(image, size=size, mode=mode, align_corners=True)


def image_pyramid(image: Tensor, shapes: Sequence[Sequence[int]], antialias: float = 0.5) -> List[Tensor]:
    """One resampled copy of ``image`` per level shape (the full-size level is ``image`` itself)."""
    return [downsample(image, s, antialias) for s in shapes]
