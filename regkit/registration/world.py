"""World-space (mm) helpers: affines, the voxel mapping of a world transform, resampling a moving
image onto the fixed grid through one, and the displacement field that the same transform is on
the fixed grid.

Conventions (those of :mod:`regkit.registration.result`):

* a *voxel-to-world affine* ``A`` is ``(ndim + 1, ndim + 1)`` float64 and maps voxel indices
  (axis 0 first) to world mm (RAS for NIfTI/MGH); a 2-D NIfTI slice's 4×4 affine becomes 3×3
  by :func:`world_affine` (the slice must lie in the world x-y plane);
* a *world matrix* ``T`` is ``(ndim + 1, ndim + 1)`` float64 and maps a point of the FIXED
  image's world to the point of the MOVING image's world it is compared with,
  ``p_moving = T @ p_fixed``; the identity compares the scans where their headers put them;
* its *voxel mapping* is ``V = inv(A_moving) @ T @ A_fixed``: fixed voxel -> moving voxel;
* the *displacement field* of ``T`` on the fixed grid, in fixed voxels and regkit's flow layout
  ``(1, ndim, *fixed_shape)``, is ``u(x) = inv(A_fixed) @ T @ A_fixed @ x - x``. It applies to
  the moving image *already resampled onto the fixed grid through the headers*
  (``resample_world(moving, A_m, A_f, shape)`` with ``T = I``): ``warp(that, u)`` samples the
  moving scan at the world point ``A_fixed (x + u(x)) = T A_fixed x``, i.e. it equals
  ``resample_world(moving, A_m, A_f, shape, T)`` up to the second interpolation.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from regkit.data.resample import resample_to_grid
from regkit.errors import InputError
from regkit.spatial import identity_grid


def world_affine(affine, ndim: int, name: str = "affine") -> np.ndarray:
    """A checked ``(ndim + 1, ndim + 1)`` float64 voxel-to-world affine.

    A 4×4 NIfTI affine of a 2-D image (``ndim=2``) is reduced to the in-plane 3×3 (rows and
    columns x, y and the translation); that needs the slice to lie in the world x-y plane
    (``A[2, 0] == A[2, 1] == 0``), else the 2-D world is not defined and this raises.
    """
    a = np.asarray(affine, dtype=np.float64)
    if ndim == 2 and a.shape == (4, 4):
        if abs(a[2, 0]) > 1e-6 * np.abs(a[:3, :2]).max() or abs(a[2, 1]) > 1e-6 * np.abs(a[:3, :2]).max():
            raise InputError(f"{name}: the 2-D image's plane is not the world x-y plane (affine rows "
                             f"{a[:3].round(4).tolist()}); a 2-D world transform is not defined for it")
        a = a[np.ix_([0, 1, 3], [0, 1, 3])]
    if a.shape != (ndim + 1, ndim + 1):
        raise InputError(f"{name}: expected a {ndim + 1}x{ndim + 1} affine for a {ndim}-D image, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise InputError(f"{name}: affine has non-finite entries")
    if not np.allclose(a[ndim], np.eye(ndim + 1)[ndim]):
        raise InputError(f"{name}: the affine's last row must be {np.eye(ndim + 1)[ndim].tolist()}, "
                         f"got {a[ndim].tolist()}")
    if abs(np.linalg.det(a[:ndim, :ndim])) < 1e-12:
        raise InputError(f"{name}: the affine is singular (voxel size 0 along some axis)")
    return a


def voxel_matrix(matrix, fixed_affine, moving_affine) -> np.ndarray:
    """Fixed voxel -> moving voxel: ``inv(A_moving) @ T @ A_fixed`` (all float64)."""
    return np.linalg.inv(np.asarray(moving_affine, np.float64)) @ np.asarray(matrix, np.float64) \
        @ np.asarray(fixed_affine, np.float64)


def world_from_voxel_matrix(voxel, fixed_affine, moving_affine) -> np.ndarray:
    """The inverse of :func:`voxel_matrix`: ``A_moving @ V @ inv(A_fixed)``, e.g. to read a
    transform that a tool wrote in index space (fixed voxel -> moving voxel)."""
    return np.asarray(moving_affine, np.float64) @ np.asarray(voxel, np.float64) \
        @ np.linalg.inv(np.asarray(fixed_affine, np.float64))


def transform_points(matrix, points) -> np.ndarray:
    """Apply a homogeneous ``(n + 1, n + 1)`` matrix to points ``(..., n)``."""
    m = np.asarray(matrix, np.float64)
    p = np.asarray(points, np.float64)
    n = m.shape[0] - 1
    return p @ m[:n, :n].T + m[:n, n]


def voxel_world_points(affine, shape: Sequence[int]) -> np.ndarray:
    """World coordinates ``(*shape, ndim)`` (mm, float64) of every voxel centre of a grid."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    return transform_points(affine, idx)


def resample_world(image: Tensor, moving_affine, fixed_affine, fixed_shape: Sequence[int],
                   matrix=None, mode: str = "bilinear") -> Tensor:
    """Resample the moving ``image`` ``(B, C, *moving_shape)`` onto the fixed grid.

    Each fixed voxel ``x`` takes the moving image's value at the moving voxel
    ``inv(A_moving) @ T @ A_fixed @ x`` (``T = matrix``, the identity when ``None``): bilinear
    (trilinear in 3-D) for images, ``mode="nearest"`` for label maps (an integer dtype is kept);
    zeros outside the moving image. Returns ``(B, C, *fixed_shape)`` on ``image``'s device.
    """
    ndim = image.dim() - 2
    t = np.eye(ndim + 1) if matrix is None else np.asarray(matrix, np.float64)
    if t.shape != (ndim + 1, ndim + 1):
        raise InputError(f"world matrix must be {ndim + 1}x{ndim + 1} for {ndim}-D images, got shape {t.shape}")
    # resample_to_grid samples at inv(src) @ dst @ x: with dst = T @ A_fixed that is the voxel mapping
    return resample_to_grid(image, moving_affine, t @ np.asarray(fixed_affine, np.float64), fixed_shape, mode)


def matrix_to_flow(matrix, fixed_affine, fixed_shape: Sequence[int], device=None,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """The displacement ``u(x) = inv(A_fixed) @ T @ A_fixed @ x - x`` of the world matrix ``T``
    on the fixed grid: ``(1, ndim, *fixed_shape)`` in fixed voxels (see the module docstring).
    Computed in float64 and cast to ``dtype``."""
    ndim = len(fixed_shape)
    a = np.asarray(fixed_affine, np.float64)
    v = np.linalg.inv(a) @ np.asarray(matrix, np.float64) @ a
    d = torch.from_numpy(v - np.eye(ndim + 1))
    x = identity_grid(fixed_shape, dtype=torch.float64)[0].reshape(ndim, -1)
    u = d[:ndim, :ndim] @ x + d[:ndim, ndim:]
    return u.reshape(1, ndim, *fixed_shape).to(device=device, dtype=dtype)


def flow_to_matrix(flow: Tensor, fixed_affine, mask: Optional[Tensor] = None) -> np.ndarray:
    """The world matrix whose displacement (:func:`matrix_to_flow`) best fits ``flow``
    ``(1, ndim, *fixed_shape)`` in the least-squares sense (over ``mask`` voxels when given).
    Exact, to float64 round-off, for a field that is affine."""
    ndim = flow.dim() - 2
    shape = flow.shape[2:]
    x = identity_grid(shape, dtype=torch.float64)[0].reshape(ndim, -1)
    y = x + flow[0].detach().to("cpu", torch.float64).reshape(ndim, -1)
    if mask is not None:
        keep = mask.reshape(-1).to("cpu").bool()
        x, y = x[:, keep], y[:, keep]
    xh = torch.cat([x, torch.ones(1, x.shape[1], dtype=torch.float64)]).T
    sol = torch.linalg.lstsq(xh, y.T).solution.T.numpy()          # (ndim, ndim + 1)
    v = np.vstack([sol, np.eye(ndim + 1)[ndim]])
    a = np.asarray(fixed_affine, np.float64)
    return a @ v @ np.linalg.inv(a)
