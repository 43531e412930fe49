"""Separable Gaussian smoothing of images and fields, exact and device-agnostic.

The kernel is the sampled Gaussian ``g(k) = exp(-k² / (2σ²))`` for ``|k| <= r`` with
``r = ceil(truncate · σ)`` voxels, normalised to sum 1 (so a constant field is kept exactly away
from the borders). Filtering runs axis after axis as a weighted sum of shifted slices of a
padded tensor: ``2r + 1`` vectorised multiply-adds per voxel and axis, on whatever device the
input lives, in its dtype; equal to ``conv{2,3}d`` with the outer-product kernel to round-off.

Border handling: ``"replicate"`` (the default) extends the edge value, so a smoothed
displacement field is not pulled towards zero at the faces of the volume; ``"zeros"`` is the
plain zero-padded convolution (used for the Gaussian pyramid's anti-aliasing, where the image
background is zero anyway).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from regkit.errors import InputError, check_choice

PADDINGS = ("replicate", "zeros")


def gaussian_kernel1d(sigma: float, truncate: float = 3.0, device=None, dtype=torch.float32) -> Tensor:
    """Normalised sampled Gaussian ``(2r + 1,)``, ``r = ceil(truncate · sigma)``; ``sigma`` in voxels.

    ``sigma == 0`` gives the identity kernel ``[1]``."""
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise InputError(f"Gaussian sigma must be a finite number >= 0 (voxels), got {sigma!r}")
    if truncate <= 0:
        raise InputError(f"Gaussian truncate must be > 0 (in sigmas), got {truncate!r}")
    if sigma == 0:
        return torch.ones(1, device=device, dtype=dtype)
    r = max(1, int(math.ceil(truncate * sigma)))
    k = torch.arange(-r, r + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (k / sigma) ** 2)
    return (w / w.sum()).to(device=device, dtype=dtype)


def _sigmas(sigma: Union[float, Sequence[float]], ndim: int) -> list:
    if isinstance(sigma, (int, float)):
        return [float(sigma)] * ndim
    sig = [float(s) for s in sigma]
    if len(sig) != ndim:
        raise InputError(f"need one Gaussian sigma per spatial axis ({ndim}), got {list(sigma)}")
    return sig


def _filter_axis(y: Tensor, w: list, dim: int, padding: str) -> Tensor:
    """``y`` filtered along ``dim`` by the symmetric kernel ``w`` (odd length ``2r + 1``).

    No padded copy: the centre tap is one multiplication, each other tap an in-place
    addition of a shifted slice into the overlapping slice of the result; for ``replicate``
    the taps that fall outside add their weight times the edge value on the ``r`` edge slices."""
    r = len(w) // 2
    n = y.shape[dim]
    acc = y * w[r]
    for k in range(1, r + 1):
        if k >= n:
            break
        acc.narrow(dim, k, n - k).add_(y.narrow(dim, 0, n - k), alpha=w[r + k])   # tap x - k
        acc.narrow(dim, 0, n - k).add_(y.narrow(dim, k, n - k), alpha=w[r - k])   # tap x + k
    if padding == "replicate":
        first, last = y.narrow(dim, 0, 1), y.narrow(dim, n - 1, 1)
        for i in range(min(r, n)):
            # voxel i misses the taps x - k for k > i (left); voxel n-1-i the taps x + k for k > i
            missing = sum(w[r + k] for k in range(i + 1, r + 1))
            acc.narrow(dim, i, 1).add_(first, alpha=missing)
            acc.narrow(dim, n - 1 - i, 1).add_(last, alpha=missing)
    return acc


def gaussian_smooth(x: Tensor, sigma: Union[float, Sequence[float]], truncate: float = 3.0,
                    padding: str = "replicate", out: Optional[Tensor] = None) -> Tensor:
    """Gaussian-smooth every channel of ``x`` ``(B, C, *spatial)`` (2 or 3 spatial dims).

    Args:
        x: images or fields; every channel is filtered on its own (a displacement's components
            are smoothed independently, which commutes with the voxel units).
        sigma: standard deviation in voxels, one number or one per spatial axis; 0 skips an axis.
        truncate: kernel half-width in sigmas.
        padding: ``"replicate"`` or ``"zeros"`` (see the module docstring).
        out: optional tensor of ``x``'s shape to write the result into (may be ``x`` itself).
    Returns:
        The smoothed tensor, same shape and dtype as ``x``. Not differentiable-by-design: callers
        smooth updates under ``torch.no_grad`` (autograd still works, it is only slower).
    """
    check_choice("smoothing padding", padding, PADDINGS)
    if not isinstance(x, Tensor) or x.dim() not in (4, 5):
        raise InputError(f"gaussian_smooth expects (B, C, H, W) or (B, C, D, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    ndim = x.dim() - 2
    sigmas = _sigmas(sigma, ndim)
    y = x
    for d, s in enumerate(sigmas):
        if s == 0:
            continue
        w = gaussian_kernel1d(s, truncate, dtype=torch.float64).tolist()
        y = _filter_axis(y, w, 2 + d, padding)
    if out is not None:
        out.copy_(y)
        return out
    return y if y is not x else x.clone()
