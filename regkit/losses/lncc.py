"""Local normalised cross-correlation (LNCC), three exact implementations.

All three compute the reference formula of VoxelMorph / TransMorph (``NCC_vxm``) / LKU-Net with
an odd window ``w`` and ``n = w**ndim``:

* window sums ``S_I, S_J, S_II, S_JJ, S_IJ`` by a ones box filter with zero padding ``w // 2``
  (border windows are truncated but still divided by ``n``);
* ``cross = S_IJ - S_I S_J / n``, ``var_I = S_II - S_I**2 / n``, ``var_J`` likewise;
* ``cc = cross**2 / (var_I var_J + eps)`` and ``loss = -mean(cc)`` over voxels, channels and
  batch. The value lies in about ``[-1, 0]``; lower is better.

They differ only in how the five window sums are obtained:

``lncc``        five sequential ``w**ndim`` convolutions (VoxelMorph; FastLNCC Algorithm 1).
``lncc_group``  one grouped convolution over ``cat(I, J, I², J², IJ)`` (FastLNCC Algorithm 2,
                Chen et al., "FastLNCC" preprint).
``lncc_fast``   running sums: the box filter is separable, and along each axis a window sum is
                the difference of two cumulative sums, so each map costs ``2 * ndim`` passes
                instead of ``w**ndim`` multiply-adds per voxel. Its backward is written by hand:
                a zero-padded symmetric box filter is self-adjoint, so the gradient is three
                more box filters (five when both inputs need gradients) of per-voxel terms.
                The images are centred first (with an exact correction for truncated border
                windows), variances are clamped at zero and ``cross²`` at ``var_I var_J``, so
                float32 cancellation cannot make a variance negative or ``cc`` leave [0, 1).

Channels are treated independently; inputs are ``(B, C, *spatial)`` with 2 or 3 spatial dims.
All three compute in float32 (or float64) whatever the input dtype or autocast state.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regkit.errors import InputError
from regkit.losses.registry import LOSSES


def check_image_pair(pred: Tensor, target: Tensor, name: str) -> int:
    """Validate ``(B, C, *spatial)`` pairs of equal shape; returns ndim."""
    for what, t in (("warped", pred), ("fixed", target)):
        if not isinstance(t, Tensor):
            raise InputError(f"{name}: {what} must be a tensor, got {type(t).__name__}")
    if pred.shape != target.shape:
        raise InputError(
            f"{name}: warped and fixed must have the same shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    if pred.dim() not in (4, 5):
        raise InputError(
            f"{name}: expected (B, C, H, W) or (B, C, D, H, W), got shape {tuple(pred.shape)}"
        )
    return pred.dim() - 2


def check_window(window: int, name: str) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise InputError(f"{name}: window must be an odd positive integer, got {window!r}")
    return window


def cc_from_sums(s_i: Tensor, s_j: Tensor, s_ii: Tensor, s_jj: Tensor, s_ij: Tensor,
                 n: int, eps: float) -> Tensor:
    """Reference formula, term for term as in VoxelMorph/TransMorph: per-voxel ``cc``."""
    u_i = s_i / n
    u_j = s_j / n
    cross = s_ij - u_j * s_i - u_i * s_j + u_i * u_j * n
    var_i = s_ii - 2 * u_i * s_i + u_i * u_i * n
    var_j = s_jj - 2 * u_j * s_j + u_j * u_j * n
    return cross * cross / (var_i * var_j + eps)


class _LNCCBase(nn.Module):
    """Shared options and checks. ``forward(warped, fixed)`` -> scalar, lower is better."""

    inputs = "images"

    def __init__(self, window: int = 9, eps: float = 1e-5) -> None:
        super().__init__()
        self.window = check_window(window, type(self).__name__)
        if eps < 0:
            raise InputError(f"{type(self).__name__}: eps must be >= 0, got {eps}")
        self.eps = float(eps)
        # Ones kernels for 2-D and 3-D, as non-persistent buffers so they follow .to(device)
        # without entering checkpoints.
        self.register_buffer("kernel2d", torch.ones(1, 1, window, window), persistent=False)
        self.register_buffer("kernel3d", torch.ones(1, 1, window, window, window), persistent=False)

    def kernel(self, ndim: int, like: Tensor, out_channels: int = 1) -> Tensor:
        k = self.kernel2d if ndim == 2 else self.kernel3d
        k = k.to(device=like.device, dtype=like.dtype)
        return k.expand(out_channels, *k.shape[1:]) if out_channels > 1 else k

    def extra_repr(self) -> str:
        return f"window={self.window}, eps={self.eps}"

    def forward(self, warped: Tensor, fixed: Tensor) -> Tensor:
        ndim = check_image_pair(warped, fixed, type(self).__name__)
        # Each channel is its own single-channel image.
        b, c = warped.shape[:2]
        i = warped.reshape(b * c, 1, *warped.shape[2:])
        j = fixed.reshape(b * c, 1, *fixed.shape[2:])
        # Window sums of squares need float32's range and precision: half inputs are upcast, and
        # autocast (which would run the box convolutions in half precision) is off in here.
        if i.dtype in (torch.float16, torch.bfloat16) or j.dtype in (torch.float16, torch.bfloat16):
            i, j = i.float(), j.float()
        with torch.autocast(i.device.type, enabled=False):
            return self.compute(i, j, ndim)

    def compute(self, i: Tensor, j: Tensor, ndim: int) -> Tensor:
        raise NotImplementedError


class LNCC(_LNCCBase):
    """LNCC with five sequential box convolutions (the VoxelMorph/TransMorph reference)."""

    def compute(self, i: Tensor, j: Tensor, ndim: int) -> Tensor:
        conv = F.conv2d if ndim == 2 else F.conv3d
        k, pad = self.kernel(ndim, i), self.window // 2
        sums = [conv(x, k, padding=pad) for x in (i, j, i * i, j * j, i * j)]
        return -cc_from_sums(*sums, n=self.window ** ndim, eps=self.eps).mean()


class LNCCGroup(_LNCCBase):
    """LNCC with one grouped convolution over ``cat(I, J, I², J², IJ)`` (FastLNCC Alg. 2)."""

    def compute(self, i: Tensor, j: Tensor, ndim: int) -> Tensor:
        conv = F.conv2d if ndim == 2 else F.conv3d
        stacked = torch.cat([i, j, i * i, j * j, i * j], dim=1)
        sums = conv(stacked, self.kernel(ndim, i, out_channels=5), padding=self.window // 2, groups=5)
        return -cc_from_sums(*sums.unbind(1), n=self.window ** ndim, eps=self.eps).mean()


def box_sum(x: Tensor, window: int, dims: Sequence[int]) -> Tensor:
    """Zero-padded window sums of odd width ``window`` along ``dims``, by running sums.

    ``out[i] = cumsum[min(i + r, n - 1)] - cumsum[i - r - 1]`` (the second term 0 when
    ``i - r - 1 < 0``), one axis after the other; equal to a ones-kernel convolution with
    padding ``r = window // 2``.
    """
    r = window // 2
    for d in dims:
        n = x.shape[d]
        if r == 0:
            continue
        if 2 * r + 1 >= n:  # short axis: windows reach past both ends; pad with zeros instead
            front = x.new_zeros(*x.shape[:d], r + 1, *x.shape[d + 1:])
            back = x.new_zeros(*x.shape[:d], r, *x.shape[d + 1:])
            cs = torch.cat([front, x, back], dim=d).cumsum(d)
            x = cs.narrow(d, 2 * r + 1, n) - cs.narrow(d, 0, n)
            continue
        cs = x.cumsum(d)
        out = torch.empty_like(cs)
        # left edge: windows cut by the start of the axis
        out.narrow(d, 0, r + 1).copy_(cs.narrow(d, r, r + 1))
        # interior
        torch.sub(cs.narrow(d, 2 * r + 1, n - 2 * r - 1), cs.narrow(d, 0, n - 2 * r - 1),
                  out=out.narrow(d, r + 1, n - 2 * r - 1))
        # right edge: windows cut by the end of the axis
        torch.sub(cs.narrow(d, n - 1, 1), cs.narrow(d, n - 2 * r - 1, r), out=out.narrow(d, n - r, r))
        x = out
    return x


def window_counts(spatial: Sequence[int], window: int, like: Tensor) -> Tensor:
    """Voxels inside the volume per window, ``m(x)``, shaped to broadcast over ``(N, 1, *spatial)``."""
    r = window // 2
    m = None
    for d, n in enumerate(spatial):
        idx = torch.arange(n, device=like.device, dtype=like.dtype)
        md = (idx + r).clamp(max=n - 1) - (idx - r).clamp(min=0) + 1
        shape = [1] * len(spatial)
        shape[d] = n
        md = md.view(shape)
        m = md if m is None else m * md
    return m.view(1, 1, *spatial)


class _FastTerms:
    """Window statistics of centred images, with the exact correction for truncated windows.

    With ``I' = I - c_I`` (``c_I`` the image mean, a constant), ``a = S_I'``, ``b = S_J'``,
    ``k = 1 - m/n`` (zero wherever the window lies inside the volume):

        cross = (S_I'J' - a b / n) + k (c_J a + c_I b + c_I c_J m)
        var_I = (S_I'I' - a² / n)  + k (2 c_I a + c_I² m)

    which equals the uncentred formula exactly, but keeps float32 cancellation small when the
    intensities carry a large offset. Variances are clamped at 0 and ``cross²`` at
    ``var_I var_J`` (Cauchy-Schwarz), so ``0 <= cc < 1`` whatever the rounding.
    """

    def __init__(self, sums: Tensor, c_i: Tensor, c_j: Tensor, k: Tensor, m: Tensor, n: int, eps: float) -> None:
        a, b, s_ii, s_jj, s_ij = sums.unbind(1)
        a, b, s_ii, s_jj, s_ij = (t.unsqueeze(1) for t in (a, b, s_ii, s_jj, s_ij))
        self.a, self.b, self.c_i, self.c_j, self.k, self.n = a, b, c_i, c_j, k, n
        cross = s_ij - a * b / n + k * (c_j * a + c_i * b + c_i * c_j * m)
        var_i = s_ii - a * a / n + k * (2 * c_i * a + c_i * c_i * m)
        var_j = s_jj - b * b / n + k * (2 * c_j * b + c_j * c_j * m)
        self.pos_i, self.pos_j = var_i > 0, var_j > 0
        self.var_i, self.var_j = var_i.clamp_min(0), var_j.clamp_min(0)
        self.cross = cross
        self.prod = self.var_i * self.var_j
        self.bounded = cross * cross <= self.prod  # False only through rounding
        self.denom = self.prod + eps

    def cc(self) -> Tensor:
        return torch.minimum(self.cross * self.cross, self.prod) / self.denom

    def grads(self, g: Tensor):
        """d(g * cc)/d(a, b, S_I'I', S_J'J', S_I'J') per voxel."""
        inv = 1.0 / self.denom
        cc = self.cc()
        # cc = min(cross², P) / (P + eps), P = var_i var_j
        g_cross = torch.where(self.bounded, g * 2 * self.cross * inv, torch.zeros_like(inv))
        d_prod = torch.where(self.bounded, -cc * inv, (1 - cc) * inv)  # d cc / d P
        g_var_i = g * d_prod * self.var_j * self.pos_i
        g_var_j = g * d_prod * self.var_i * self.pos_j
        a, b, n, k, c_i, c_j = self.a, self.b, self.n, self.k, self.c_i, self.c_j
        g_a = g_cross * (k * c_j - b / n) + g_var_i * 2 * (k * c_i - a / n)
        g_b = g_cross * (k * c_i - a / n) + g_var_j * 2 * (k * c_j - b / n)
        return g_a, g_b, g_var_i, g_var_j, g_cross


class _FastLNCCFunction(torch.autograd.Function):
    """-mean(cc) from running-sum box filters of the centred images, with a hand-written backward.

    i, j: ``(N, 1, *spatial)``. Saves the centred inputs and the five window sums.
    """

    @staticmethod
    def forward(ctx, i: Tensor, j: Tensor, window: int, eps: float) -> Tensor:
        dims = list(range(2, i.dim()))
        n = window ** len(dims)
        # Image means as constants: the identity above holds for any constant, so no gradient flows.
        c_i = i.detach().mean(dim=dims, keepdim=True)
        c_j = j.detach().mean(dim=dims, keepdim=True)
        ic, jc = i - c_i, j - c_j
        sums = box_sum(torch.cat([ic, jc, ic * ic, jc * jc, ic * jc], dim=1), window, dims)
        m = window_counts(i.shape[2:], window, i)
        k = 1 - m / n
        terms = _FastTerms(sums, c_i, c_j, k, m, n, eps)
        loss = -terms.cc().mean()
        ctx.save_for_backward(ic, jc, sums, c_i, c_j)
        ctx.window, ctx.eps = window, eps
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        ic, jc, sums, c_i, c_j = ctx.saved_tensors
        need_i, need_j = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_i or need_j):
            return None, None, None, None
        dims = list(range(2, ic.dim()))
        n = ctx.window ** len(dims)
        m = window_counts(ic.shape[2:], ctx.window, ic)
        terms = _FastTerms(sums, c_i, c_j, 1 - m / n, m, n, ctx.eps)
        g_a, g_b, g_ii, g_jj, g_ij = terms.grads(grad_out * (-1.0 / ic.numel()))
        del terms
        maps = ([g_a, g_ii] if need_i else []) + ([g_b, g_jj] if need_j else []) + [g_ij]
        # The zero-padded symmetric box filter is self-adjoint: back-propagate with the same filter.
        back = box_sum(torch.cat(maps, dim=1), ctx.window, dims)
        b_ij = back[:, -1:]
        grad_i = grad_j = None
        if need_i:
            grad_i = back[:, 0:1] + 2 * ic * back[:, 1:2] + jc * b_ij
        if need_j:
            o = 2 if need_i else 0
            grad_j = back[:, o:o + 1] + 2 * jc * back[:, o + 1:o + 2] + ic * b_ij
        return grad_i, grad_j, None, None


class LNCCFast(_LNCCBase):
    """LNCC by running-sum box filters with an analytic backward (regkit's fast exact method).

    Like every form here, half-precision inputs are computed in float32 and the result is
    float32.
    """

    def compute(self, i: Tensor, j: Tensor, ndim: int) -> Tensor:
        return _FastLNCCFunction.apply(i, j, self.window, self.eps)


@LOSSES.register
def lncc(window: int = 9, eps: float = 1e-5) -> LNCC:
    return LNCC(window=window, eps=eps)


@LOSSES.register
def lncc_group(window: int = 9, eps: float = 1e-5) -> LNCCGroup:
    return LNCCGroup(window=window, eps=eps)


@LOSSES.register
def lncc_fast(window: int = 9, eps: float = 1e-5) -> LNCCFast:
    return LNCCFast(window=window, eps=eps)
