"""Warping images by displacement fields, and operations on fields.

Conventions used everywhere in regkit:

* an image is ``(B, C, *spatial)`` with ``len(spatial)`` = ndim in {2, 3};
* a flow (displacement field) is ``(B, ndim, *spatial)`` in **voxels**; channel ``k`` is the
  displacement along spatial axis ``k`` (axis 0 = first spatial dimension);
* ``warp(image, flow)(x) = image(x + flow(x))``: the flow is a pull-back, defined on the
  fixed (output) grid and pointing into the moving image.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regkit.errors import InputError, check_choice

_MODES = {"bilinear": "bilinear", "linear": "bilinear", "trilinear": "bilinear", "nearest": "nearest"}
_PADDING = ("zeros", "border", "reflection")


def _check_field(image: Tensor, flow: Tensor) -> int:
    if not isinstance(image, Tensor) or not isinstance(flow, Tensor):
        raise InputError(f"warp expects tensors, got image={type(image).__name__}, flow={type(flow).__name__}")
    ndim = flow.dim() - 2
    if ndim not in (2, 3):
        raise InputError(
            f"flow must be (B, ndim, *spatial) with ndim 2 or 3, got shape {tuple(flow.shape)}"
        )
    if flow.shape[1] != ndim:
        raise InputError(
            f"flow has {flow.shape[1]} channels but {ndim} spatial dims; expected shape "
            f"(B, {ndim}, *spatial), got {tuple(flow.shape)}"
        )
    if image.dim() != flow.dim() or tuple(image.shape[2:]) != tuple(flow.shape[2:]):
        raise InputError(
            f"image {tuple(image.shape)} and flow {tuple(flow.shape)} must share the spatial shape "
            f"(B, C, *spatial) vs (B, ndim, *spatial)"
        )
    if image.shape[0] != flow.shape[0] and flow.shape[0] != 1:
        raise InputError(f"batch sizes differ: image {image.shape[0]}, flow {flow.shape[0]}")
    return ndim


_GRID_CACHE: Dict[Tuple, Tensor] = {}


def identity_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> Tensor:
    """Voxel coordinates ``(1, ndim, *shape)``: channel k holds the index along axis k."""
    # Under torch.compile the grid is built inside the graph: a lookup in the cache would be a
    # guard, and every new entry would recompile the model.
    compiling = torch.compiler.is_compiling()
    key = (tuple(shape), torch.device(device) if device is not None else torch.device("cpu"), dtype)
    grid = None if compiling else _GRID_CACHE.get(key)
    if grid is None:
        vectors = [torch.arange(s, device=device, dtype=dtype) for s in shape]
        grid = torch.stack(torch.meshgrid(*vectors, indexing="ij")).unsqueeze(0)
        if compiling:
            return grid
        if len(_GRID_CACHE) > 32:  # bounded: a few shapes per run in practice
            _GRID_CACHE.clear()
        _GRID_CACHE[key] = grid
    return grid


def sample_at(image: Tensor, coords: Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> Tensor:
    """Sample ``image`` at voxel coordinates.

    Args:
        image: ``(B, C, *in_shape)``.
        coords: ``(B, ndim, *out_shape)`` or ``(1, ndim, *out_shape)`` (broadcast over the batch):
            channel k holds the position along axis k of ``image`` in voxels (0 = first voxel
            centre, ``n - 1`` = last; ``grid_sample``'s ``align_corners=True``).
        mode: ``bilinear`` (linear in 2-D and 3-D) or ``nearest``.
        padding_mode: value outside the image: ``zeros``, ``border`` or ``reflection``.
    Returns:
        ``(B, C, *out_shape)`` in the dtype of ``image``; integer images are sampled in the
        coordinates' float dtype and rounded back. Autocast is off inside: positions need the
        precision.
    """
    check_choice("sampling mode", mode, _MODES)
    check_choice("padding_mode", padding_mode, _PADDING)
    ndim = coords.shape[1]
    in_shape = image.shape[2:]
    if len(in_shape) != ndim or coords.dim() != ndim + 2:
        raise InputError(f"coords {tuple(coords.shape)} must be (B, {len(in_shape)}, *out_shape) for an image "
                         f"{tuple(image.shape)}")
    # 2 / (n - 1) maps voxel index to [-1, 1]; size-1 axes have no extent to normalise.
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in in_shape], device=coords.device, dtype=coords.dtype)
    grid = coords * scale.view(1, ndim, *([1] * ndim)) - 1.0
    # grid_sample wants the channel last and in reversed (x = last axis) order.
    grid = grid.permute(0, *range(2, ndim + 2), 1).flip(-1)
    if grid.shape[0] != image.shape[0]:
        grid = grid.expand(image.shape[0], *grid.shape[1:])
    out_dtype = image.dtype
    src = image if image.dtype == coords.dtype else image.to(coords.dtype)
    with torch.autocast(coords.device.type, enabled=False):
        out = F.grid_sample(src, grid, mode=_MODES[mode], padding_mode=padding_mode, align_corners=True)
    if not out_dtype.is_floating_point:
        return out.round().to(out_dtype)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def warp(image: Tensor, flow: Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> Tensor:
    """Resample ``image`` at ``x + flow(x)``.

    Args:
        image: ``(B, C, *spatial)``.
        flow: ``(B, ndim, *spatial)`` displacement in voxels (batch 1 broadcasts).
        mode: ``"bilinear"`` (linear in 2-D and 3-D; aliases ``linear``/``trilinear``) or
            ``"nearest"`` for label maps (exact for zero and integer displacements).
        padding_mode: value outside the image: ``"zeros"``, ``"border"`` or ``"reflection"``.
    Returns:
        ``(B, C, *spatial)`` in the dtype of ``image``. Half-precision fields are sampled in
        float32, also under autocast: sampling positions need the precision.
    """
    check_choice("warp mode", mode, _MODES)
    check_choice("padding_mode", padding_mode, _PADDING)
    _check_field(image, flow)
    if flow.shape[0] != image.shape[0]:
        flow = flow.expand(image.shape[0], *flow.shape[1:])
    if flow.dtype in (torch.float16, torch.bfloat16):
        flow = flow.float()
    return sample_at(image, identity_grid(flow.shape[2:], flow.device, flow.dtype) + flow, mode, padding_mode)


class SpatialTransformer(nn.Module):
    """Module form of :func:`warp`, so the interpolation choice lives in the config.

    ``forward(image, flow)`` with image ``(B, C, *spatial)`` and flow ``(B, ndim, *spatial)`` in
    voxels.
    """

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros") -> None:
        super().__init__()
        check_choice("warp mode", mode, _MODES)
        check_choice("padding_mode", padding_mode, _PADDING)
        self.mode = mode
        self.padding_mode = padding_mode

    def forward(self, image: Tensor, flow: Tensor) -> Tensor:
        return warp(image, flow, self.mode, self.padding_mode)

    def spec(self) -> dict:
        """Plain-data description, enough to rebuild this transformer."""
        return {"mode": self.mode, "padding_mode": self.padding_mode}

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, padding_mode={self.padding_mode!r}"


def compose_flows(first: Tensor, second: Tensor) -> Tensor:
    """Flow equal to warping by ``first`` and then by ``second``.

    ``warp(warp(img, first), second) == warp(img, compose_flows(first, second))`` up to
    interpolation error: ``second(x) + first(x + second(x))``.
    """
    return second + warp(first, second, padding_mode="border")


def resize_flow(flow: Tensor, size: Sequence[int]) -> Tensor:
    """Resample a flow to ``size`` and rescale its vectors (voxels of the new grid)."""
    ndim = flow.dim() - 2
    old = flow.shape[2:]
    if tuple(old) == tuple(size):
        return flow
    mode = "bilinear" if ndim == 2 else "trilinear"
    out = F.interpolate(flow, size=tuple(size), mode=mode, align_corners=True)
    factors = [(n - 1) / max(o - 1, 1) for n, o in zip(size, old)]
    return out * torch.tensor(factors, device=flow.device, dtype=flow.dtype).view(1, ndim, *([1] * ndim))


def integrate_velocity(velocity: Tensor, steps: int = 7, downsize: int = 1) -> Tensor:
    """Scaling and squaring of a stationary velocity field (voxels) into a displacement.

    ``phi = exp(v)``: ``v / 2**steps`` is composed with itself ``steps`` times. With
    ``downsize > 1`` the integration runs on a grid ``downsize`` times coarser and the result is
    resampled back, which is cheaper and smoother (VoxelMorph's ``int_downsize``).
    """
    if steps < 0:
        raise InputError(f"integration steps must be >= 0, got {steps}")
    if downsize < 1:
        raise InputError(f"downsize must be >= 1, got {downsize}")
    full = velocity.shape[2:]
    v = velocity
    if downsize > 1:
        v = resize_flow(v, [max(2, round(s / downsize)) for s in full])
    v = v / (2 ** steps)
    for _ in range(steps):
        v = v + warp(v, v, padding_mode="border")
    return resize_flow(v, full) if downsize > 1 else v


def jacobian_determinant(flow: Tensor) -> Tensor:
    """Determinant of the Jacobian of ``x + flow(x)``, ``(B, *spatial)``.

    Central differences inside, one-sided at the borders (``torch.gradient``, as
    ``np.gradient`` in the IXI evaluation code). A pure translation gives exactly 1.
    """
    ndim = flow.dim() - 2
    if ndim not in (2, 3) or flow.shape[1] != ndim:
        raise InputError(f"flow must be (B, ndim, *spatial) with ndim 2 or 3, got {tuple(flow.shape)}")
    # J[i][j] = d(x_i + u_i)/dx_j
    grads = [torch.gradient(flow[:, i], dim=list(range(1, ndim + 1))) for i in range(ndim)]
    J = [[grads[i][j] + (1.0 if i == j else 0.0) for j in range(ndim)] for i in range(ndim)]
    if ndim == 2:
        return J[0][0] * J[1][1] - J[0][1] * J[1][0]
    return (
        J[0][0] * (J[1][1] * J[2][2] - J[1][2] * J[2][1])
        - J[0][1] * (J[1][0] * J[2][2] - J[1][2] * J[2][0])
        + J[0][2] * (J[1][0] * J[2][1] - J[1][1] * J[2][0])
    )
