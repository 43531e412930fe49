"""Global image similarity terms: ``ncc`` (1 - Pearson correlation), ``mse`` and ``mi``.

Each is called ``loss(warped, fixed)`` on ``(B, C, *spatial)`` images (2 or 3 spatial dims) and
returns a scalar, lower is better. LNCC, the local windowed correlation, is in ``lncc.py``.
"""
from __future__ import annotations

import torch
from monai.losses import GlobalMutualInformationLoss
from torch import Tensor, nn

from regkit.errors import InputError
from regkit.losses.lncc import check_image_pair, computes_in_float32
from regkit.losses.registry import LOSSES


@LOSSES.register(name="ncc")
class NCC(nn.Module):
    """Global normalised cross-correlation loss: ``1 - mean over (b, c) of rho(I_bc, J_bc)``.

    ``rho = mean(I' J') / (s_I s_J)`` with ``I' = I - mean(I)`` over the spatial dims of one
    batch item and channel, and ``s_I = sqrt(max(mean(I'²), eps))``: the Pearson correlation,
    not squared, as the light-weight student's reconstruction loss ``l_rec = 1 - CorrCoef``.
    The value lies in [0, 2]; 0 for images equal up to a positive affine intensity map
    (``J = a I + b``, ``a > 0``). ``eps`` (intensity units squared) only matters for a constant
    image, whose correlation is then 0 (loss 1) with a finite gradient.
    """

    inputs = "images"

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        if not eps > 0:
            raise InputError(f"NCC: eps must be > 0, got {eps}")
        self.eps = float(eps)

    @computes_in_float32
    def forward(self, warped: Tensor, fixed: Tensor) -> Tensor:
        check_image_pair(warped, fixed, "NCC")
        dims = tuple(range(2, warped.dim()))
        i = warped - warped.mean(dim=dims, keepdim=True)
        j = fixed - fixed.mean(dim=dims, keepdim=True)
        cov = (i * j).mean(dim=dims)
        s_i = (i * i).mean(dim=dims).clamp_min(self.eps).sqrt()
        s_j = (j * j).mean(dim=dims).clamp_min(self.eps).sqrt()
        return 1 - (cov / (s_i * s_j)).mean()

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


@LOSSES.register(name="mse")
class MSE(nn.Module):
    """Mean squared intensity difference ``mean((warped - fixed)²)`` over every voxel, channel
    and batch item, in intensity units squared (VoxelMorph's MSE similarity)."""

    inputs = "images"

    @computes_in_float32
    def forward(self, warped: Tensor, fixed: Tensor) -> Tensor:
        check_image_pair(warped, fixed, "MSE")
        return (warped - fixed).pow(2).mean()


@LOSSES.register(name="mi")
class MutualInformation(nn.Module):
    """Negative global mutual information (nats) by Parzen windowing: MONAI's
    ``GlobalMutualInformationLoss`` (a Gaussian kernel on ``num_bins`` bin centres evenly spaced
    over [0, 1], kernel sigma = ``sigma_ratio`` x the bin spacing; MONAI's defaults 23 bins and
    0.5), averaged over the batch. Channels are pooled into one joint histogram per item.

    Intensities must lie in [0, 1] (normalise the dataset, e.g. ``dataset.normalize=minmax``):
    MONAI clamps to that range, which would silently flatten the loss and its gradient for
    everything outside, so values beyond ``[-tol, 1 + tol]`` raise an error instead.
    The value is ``-MI``, in about ``[-log(num_bins), 0]``; lower is better.
    """

    inputs = "images"

    def __init__(self, num_bins: int = 23, sigma_ratio: float = 0.5, tol: float = 1e-3) -> None:
        super().__init__()
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise InputError(f"MutualInformation: num_bins must be an integer >= 2, got {num_bins!r}")
        if not sigma_ratio > 0:
            raise InputError(f"MutualInformation: sigma_ratio must be > 0, got {sigma_ratio}")
        self.num_bins, self.sigma_ratio, self.tol = num_bins, float(sigma_ratio), float(tol)
        self.mi = GlobalMutualInformationLoss(kernel_type="gaussian", num_bins=num_bins, sigma_ratio=sigma_ratio)

    @computes_in_float32
    def forward(self, warped: Tensor, fixed: Tensor) -> Tensor:
        check_image_pair(warped, fixed, "MutualInformation")
        for what, t in (("warped", warped), ("fixed", fixed)):
            lo, hi = torch.aminmax(t.detach())
            if lo < -self.tol or hi > 1 + self.tol:
                raise InputError(
                    f"MutualInformation: {what} intensities must lie in [0, 1], got [{lo.item():.4g}, "
                    f"{hi.item():.4g}]; normalise the images (e.g. dataset.normalize=minmax)"
                )
        return self.mi(warped, fixed)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, sigma_ratio={self.sigma_ratio:g}"
