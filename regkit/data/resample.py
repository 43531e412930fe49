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
from torch import Tensor

from regkit.errors import InputError
from regkit.spatial import identity_grid, sample_at

MODES = ("bilinear", "nearest")


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
    return sample_at(image, coords[None], mode, "border")


def resized_spacing(spacing: Sequence[float], old: Sequence[int], new: Sequence[int]) -> tuple:
    """Voxel size (mm) after :func:`resize_volume` from ``old`` to ``new`` voxels."""
    return tuple(float(s) * (o - 1) / max(n - 1, 1) for s, o, n in zip(spacing, old, new))


def transform_points(matrix: np.ndarray, points: Tensor) -> Tensor:
    """Apply a homogeneous ``(ndim + 1) × (ndim + 1)`` matrix to voxel positions ``(B, ndim, *shape)``
    (channel k = coordinate along axis k); float64 in, float64 out."""
    ndim = points.shape[1]
    m = torch.as_tensor(np.asarray(matrix, np.float64), dtype=points.dtype, device=points.device)
    if m.shape != (ndim + 1, ndim + 1):
        raise InputError(f"matrix must be {ndim + 1}x{ndim + 1} for {ndim}-D points, got {tuple(m.shape)}")
    flat = points.reshape(points.shape[0], ndim, -1)
    out = torch.einsum("ij,bjn->bin", m[:ndim, :ndim], flat) + m[:ndim, ndim].view(1, ndim, 1)
    return out.reshape(points.shape)


def resample_to_grid(image: Tensor, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: Sequence[int],
                     mode: str = "bilinear") -> Tensor:
    """Resample ``image`` ``(B, C, *src_shape)`` with voxel-to-world ``src_affine`` onto the grid
    ``dst_shape`` with ``dst_affine`` (4×4, world mm). Outside the source: zeros."""
    vox = np.linalg.inv(np.asarray(src_affine, np.float64)) @ np.asarray(dst_affine, np.float64)
    grid = identity_grid(dst_shape, image.device, torch.float64)
    return sample_at(image, transform_points(vox, grid), mode, "zeros")
