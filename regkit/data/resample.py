"""Resampling volumes: to another grid size (training at a reduced size) and, through the
affines, onto another image's voxel grid (NIfTI-in, NIfTI-out registration).

Both use ``grid_sample`` with ``align_corners=True``: the first and last voxel centres of the
old and new grids coincide, the convention :func:`regkit.spatial.resize_flow` uses for fields,
so that an image resized, registered and brought back stays consistent with its flow.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regkit.errors import InputError, check_choice

MODES = ("bilinear", "nearest")


def _sample(image: Tensor, coords: Tensor, mode: str, padding_mode: str) -> Tensor:
    """Sample ``image`` ``(B, C, *in)`` at voxel coordinates ``coords`` ``(ndim, *out)``."""
    check_choice("resampling mode", mode, MODES)
    ndim = coords.shape[0]
    in_shape = image.shape[2:]
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in in_shape], dtype=coords.dtype, device=coords.device)
    grid = coords * scale.view(ndim, *([1] * ndim)) - 1.0
    grid = grid.permute(*range(1, ndim + 1), 0).flip(-1)[None].expand(image.shape[0], *([-1] * (ndim + 1)))
    out_dtype = image.dtype
    src = image.to(coords.dtype)
    out = F.grid_sample(src, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    return out.round().to(out_dtype) if not out_dtype.is_floating_point else out.to(out_dtype)


def resize_volume(image: Tensor, size: Sequence[int], mode: str = "bilinear") -> Tensor:
    """Resample ``(B, C, *spatial)`` to ``size`` voxels over the same extent (corner voxel
    centres kept). Label maps (integer dtype) should use ``mode="nearest"``; the dtype is kept."""
    size = tuple(int(s) for s in size)
    if tuple(image.shape[2:]) == size:
        return image
    if len(size) != image.dim() - 2:
        raise InputError(f"resize: size {size} does not match the {image.dim() - 2} spatial dims of {tuple(image.shape)}")
    axes = [torch.linspace(0, n_in - 1, n_out, dtype=torch.float64) for n_in, n_out in zip(image.shape[2:], size)]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij")).to(image.device)
    return _sample(image, coords, mode, "border")


def resized_spacing(spacing: Sequence[float], old: Sequence[int], new: Sequence[int]) -> tuple:
    """Voxel size (mm) after :func:`resize_volume` from ``old`` to ``new`` voxels."""
    return tuple(float(s) * (o - 1) / max(n - 1, 1) for s, o, n in zip(spacing, old, new))


def resample_to_grid(image: Tensor, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: Sequence[int],
                     mode: str = "bilinear") -> Tensor:
    """Resample ``image`` ``(B, C, *src_shape)`` with voxel-to-world ``src_affine`` onto the grid
    ``dst_shape`` with ``dst_affine`` (4×4, world mm). Outside the source: zeros."""
    vox = np.linalg.inv(np.asarray(src_affine, np.float64)) @ np.asarray(dst_affine, np.float64)
    ndim = len(dst_shape)
    axes = [torch.arange(n, dtype=torch.float64) for n in dst_shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij")).reshape(ndim, -1)
    m = torch.from_numpy(vox)
    coords = (m[:ndim, :ndim] @ grid + m[:ndim, ndim:]).reshape(ndim, *dst_shape).to(image.device)
    return _sample(image, coords, mode, "zeros")
