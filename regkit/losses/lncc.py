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
``lncc_fast``   separable box filters by doubling: along each axis, sums of 2, 4, 8, ... entries
                are one vectorised addition each, and a window of width 9 is the sum of two of
                them, so each map costs ``4 * ndim`` additions per voxel instead of ``w**ndim``
                multiply-adds. Its backward is written by hand: a zero-padded symmetric box
                filter is self-adjoint, so the gradient is three more box filters (five when
                both inputs need gradients) of per-voxel terms. Every window sum is a short
                addition tree of its own entries, so its rounding is relative to the window
                itself. The images are shifted by their minimum first (with an exact correction
                for truncated border windows), variances below their own rounding error are set
                to zero and ``cross²`` is clamped at ``var_I var_J``, so float32 cancellation
                cannot make a variance negative or ``cc`` leave [0, 1). In float32 it is more
                accurate than the five-convolution reference (docs/losses.md).

Channels are treated independently; inputs are ``(B, C, *spatial)`` with 2 or 3 spatial dims.
All three compute in float32 (or float64) whatever the input dtype or autocast state.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regkit.errors import InputError
from regkit.losses.registry import LOSSES


def computes_in_float32(forward):
    """Decorator for a loss ``forward(self, a, b, ...)``: half-precision tensor inputs are upcast to
    float32 and autocast is off inside, so the loss is the float32 value whatever the caller's
    precision (window sums of squares, histograms and means need float32's range and precision)."""

    @functools.wraps(forward)
    def wrapper(self, a: Tensor, b: Tensor, *args, **kwargs):
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            if a.dtype in (torch.float16, torch.bfloat16) or b.dtype in (torch.float16, torch.bfloat16):
                a, b = a.float(), b.float()
            with torch.autocast(a.device.type, enabled=False):
                return forward(self, a, b, *args, **kwargs)
        return forward(self, a, b, *args, **kwargs)

    return wrapper


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

    @computes_in_float32
    def forward(self, warped: Tensor, fixed: Tensor) -> Tensor:
        cc = self.voxel_cc(warped, fixed)
        # sum / count is the mean bit for bit; its backward hands on a broadcast view, not a map
        return -(cc.sum() / cc.numel())

    @computes_in_float32
    def voxel_cc(self, warped: Tensor, fixed: Tensor, shift: Optional[Sequence[Tensor]] = None) -> Tensor:
        """The per-voxel ``cc`` ``(B * C, 1, *spatial)`` whose mean is minus the loss, differentiable
        (for sums over part of the volume, e.g. one slab of a split registration).

        ``shift``: ``lncc_fast``'s constants ``(c_I, c_J)``, ``(B * C, 1, 1, ...)`` each, subtracted
        before its window sums (default: each image's minimum; see :class:`_FastLNCCFunction`).
        The value depends on them only through rounding; a slab passes the whole volume's
        minima to round as the whole volume does. The other forms do not shift."""
        ndim = check_image_pair(warped, fixed, type(self).__name__)
        # Each channel is its own single-channel image.
        b, c = warped.shape[:2]
        i = warped.reshape(b * c, 1, *warped.shape[2:])
        j = fixed.reshape(b * c, 1, *fixed.shape[2:])
        return self.compute(i, j, ndim, shift)

    def compute(self, i: Tensor, j: Tensor, ndim: int, shift: Optional[Sequence[Tensor]] = None) -> Tensor:
        """Per-voxel ``cc`` of ``(N, 1, *spatial)`` images."""
        raise NotImplementedError


@LOSSES.register(name="lncc")
class LNCC(_LNCCBase):
    """LNCC with five sequential box convolutions (the VoxelMorph/TransMorph reference)."""

    def compute(self, i: Tensor, j: Tensor, ndim: int, shift: Optional[Sequence[Tensor]] = None) -> Tensor:
        conv = F.conv2d if ndim == 2 else F.conv3d
        k, pad = self.kernel(ndim, i), self.window // 2
        sums = [conv(x, k, padding=pad) for x in (i, j, i * i, j * j, i * j)]
        return cc_from_sums(*sums, n=self.window ** ndim, eps=self.eps)


@LOSSES.register(name="lncc_group")
class LNCCGroup(_LNCCBase):
    """LNCC with one grouped convolution over ``cat(I, J, I², J², IJ)`` (FastLNCC Alg. 2)."""

    def compute(self, i: Tensor, j: Tensor, ndim: int, shift: Optional[Sequence[Tensor]] = None) -> Tensor:
        conv = F.conv2d if ndim == 2 else F.conv3d
        stacked = torch.cat([i, j, i * i, j * j, i * j], dim=1)
        sums = conv(stacked, self.kernel(ndim, i, out_channels=5), padding=self.window // 2, groups=5)
        return cc_from_sums(*sums.unbind(1), n=self.window ** ndim, eps=self.eps)


def _shell_boxes(spatial: Sequence[int], r: int):
    """Disjoint boxes (tuples of slices) covering the voxels within ``r`` of a face.

    The slabs at both ends of axis ``d`` are restricted to the interior of the axes before
    ``d``, so that edges and corners belong to one box only.
    """
    for d, size in enumerate(spatial):
        inner = [slice(r, s - r) for s in spatial[:d]]
        if any(sl.start >= sl.stop for sl in inner):
            return  # the earlier slabs already cover everything
        lo = min(r, size)
        for sl in (slice(0, lo), slice(max(size - r, lo), size)):
            if sl.start < sl.stop:
                yield tuple(inner) + (sl,) + tuple(slice(0, s) for s in spatial[d + 1:])


def _outside_counts(box: Sequence[slice], spatial: Sequence[int], window: int, like: Tensor) -> Tensor:
    """``n - m`` over ``box``: how many entries of each window fall outside the volume."""
    r = window // 2
    m = None
    for d, (sl, size) in enumerate(zip(box, spatial)):
        idx = torch.arange(sl.start, sl.stop, device=like.device, dtype=like.dtype)
        md = (idx + r).clamp(max=size - 1) - (idx - r).clamp(min=0) + 1
        shape = [1] * len(spatial)
        shape[d] = -1
        md = md.view(shape)
        m = md if m is None else m * md
    return (window ** len(spatial) - m).view(1, 1, *m.shape)


def window_sums(x: Tensor, window: int, dim: int, out: Optional[Tensor] = None) -> Tensor:
    """Sums of every ``window`` consecutive entries along ``dim`` ("valid": ``L - window + 1``).

    Doubling: ``s_2 = s_1 + shift(s_1, 1)``, ``s_4 = s_2 + shift(s_2, 2)``, ..., and a window is
    the sum of the ``s_(2^j)`` for the binary digits of its width, so width 9 takes four
    vectorised additions and every window sum is a balanced tree of at most ``2 log2(w)``
    additions of its own entries: rounding is relative to the window's own values (as for a
    convolution, unlike differences of long running sums), and all-zero windows give exactly 0.
    """
    n = x.shape[dim] - window + 1
    level, width, offset, pieces = x, 1, 0, []
    rest = window
    while True:
        if rest & 1:
            pieces.append(level.narrow(dim, offset, n))
            offset += width
        rest >>= 1
        if not rest:
            break
        length = level.shape[dim] - width
        level = level.narrow(dim, 0, length) + level.narrow(dim, width, length)
        width *= 2
    if len(pieces) == 1:
        return pieces[0].clone() if out is None else out.copy_(pieces[0])
    result = torch.add(pieces[0], pieces[1], out=out) if out is not None else pieces[0] + pieces[1]
    for piece in pieces[2:]:
        result.add_(piece)
    return result


def box_filter(x: Tensor, window: int, out: Optional[Tensor] = None, padded: bool = False) -> Tensor:
    """Box filter of odd width over every spatial axis of ``x`` ``(N, K, *spatial)`` with zero
    padding ``window // 2``: a ones-kernel convolution, by :func:`window_sums` axis after axis.

    ``padded=True``: ``x`` already carries the zero padding (``window - 1`` more entries per
    axis). ``x`` is never changed.
    """
    r = window // 2
    if not padded:
        x = F.pad(x, [r] * (2 * (x.dim() - 2)))
    if r == 0:
        return x.clone() if out is None else out.copy_(x)
    for d in range(2, x.dim()):
        x = window_sums(x, window, d, out=out if d == x.dim() - 1 else None)
    return x


class _PaddedMap:
    """One zero-padded ``(N, 1, *spatial)`` map, refilled for each map to filter: write into
    ``inner`` (the unpadded view), then ``filter()`` box-filters it; the border stays zero."""

    def __init__(self, like: Tensor, window: int) -> None:
        r = window // 2
        self.window = window
        self.buf = like.new_zeros(like.shape[0], 1, *(s + 2 * r for s in like.shape[2:]))
        self.inner = self.buf[(slice(None), slice(None)) + tuple(slice(r, r + s) for s in like.shape[2:])]

    def filter(self, out: Optional[Tensor] = None) -> Tensor:
        return box_filter(self.buf, self.window, out=out, padded=True)


class _FastLNCCFunction(torch.autograd.Function):
    """The per-voxel ``cc`` map from separable box filters of shifted images, with a hand-written
    backward (the loss is ``-mean(cc)``, taken by :class:`LNCCFast`).

    ``i, j``: ``(N, 1, *spatial)``. The images are shifted, ``I' = I - c_I`` with ``c_I`` the
    minimum of each image (a constant). Each of the five maps ``I', J', I'², J'², I'J'`` is
    box-filtered on its own by :func:`box_filter`, so only one padded map and its partial
    sums are alive at a time. The maps are zero-padded after the shift, the reference pads
    with zeros before it; the difference, ``(n - m)`` times ``(-c_I, -c_J, c_I², c_J², c_I c_J)``
    with ``m`` the in-volume voxels of a window, is added afterwards on the border shell
    only. Every window then holds exactly ``n = w**ndim`` values and ``S_xy - S_x S_y / n`` is
    unchanged by the shift: the result equals the reference formula exactly for any
    constant ``c``. Why the minimum: the background of most medical images is the lowest and
    the most common intensity, so it becomes exactly 0 (as in the unshifted reference, where
    an all-background window gives exact zeros), and a large intensity offset is removed
    before ``S_xx - S_x² / n`` can cancel it away in float32. (The image mean would remove the
    offset too, but turns a zero background into ``-mean`` and so spoils exactly the
    near-background windows whose small variances make ``cc`` sensitive.)

    Per voxel (``a = S_I'``, ``b = S_J'``): ``cross = S_I'J' - a b / n``,
    ``var_I = S_I'I' - a² / n``, set to 0 where it is within its own rounding error bound,
    ``4 k u S_I'I'`` (``u`` the unit roundoff, ``k`` the roundings in the longest addition chain
    of a window sum): a constant window, where cancellation would otherwise leave noise.
    ``P = var_I var_J`` and ``cc = min(cross², P) / (P + eps)`` (Cauchy-Schwarz bounds
    ``cross²`` by ``P``; only rounding can break it), so ``0 <= cc < 1``.

    Backward: the zero-padded box filter's adjoint is itself, so ``d loss / d I`` is three
    box-filtered maps of per-voxel derivatives (five when both inputs need gradients), weighted
    by the incoming ``d loss / d cc`` (a broadcast scalar for a mean or a sum: no extra map).
    Saves the inputs, their shifts and the five per-voxel statistics.
    """

    @staticmethod
    def forward(ctx, i: Tensor, j: Tensor, window: int, eps: float, c_i: Optional[Tensor] = None,
                c_j: Optional[Tensor] = None) -> Tensor:
        dims = list(range(2, i.dim()))
        spatial = i.shape[2:]
        n = window ** len(dims)
        # Shifts as constants: the result does not depend on them, so no gradient flows.
        if c_i is None or c_j is None:
            c_i, c_j = i.amin(dim=dims, keepdim=True), j.amin(dim=dims, keepdim=True)
        ic, jc = i - c_i, j - c_j
        stats = i.new_empty(i.shape[0], 5, *spatial)
        # (a, b, S_I'I', S_J'J', S_I'J') -> becomes (a, b, var_I, var_J, cross) in place below
        a, b, var_i, var_j, cross = stats.split(1, dim=1)
        pad = _PaddedMap(i, window)
        for x, y, dst in ((ic, None, a), (jc, None, b), (ic, ic, var_i), (jc, jc, var_j), (ic, jc, cross)):
            if y is None:
                pad.inner.copy_(x)
            else:
                torch.mul(x, y, out=pad.inner)
            pad.filter(out=dst)
        del ic, jc, pad
        coef = torch.cat([-c_i, -c_j, c_i * c_i, c_j * c_j, c_i * c_j], dim=1)
        for box in _shell_boxes(spatial, window // 2):
            stats[(slice(None), slice(None)) + box].addcmul_(coef, _outside_counts(box, spatial, window, i))
        # roundings along a window sum's longest chain: per axis the doubling levels and the
        # pieces added (window_sums), then the product and the border correction
        k = len(dims) * (window.bit_length() + bin(window).count("1")) + 2
        tiny = 4 * k * torch.finfo(i.dtype).eps / 2
        cross.addcmul_(a, b, value=-1.0 / n)
        for var, s in ((var_i, a), (var_j, b)):
            noise = var * tiny
            var.addcmul_(s, s, value=-1.0 / n)
            var.masked_fill_(var <= noise, 0)
            del noise
        prod = var_i * var_j
        cc = torch.minimum(cross * cross, prod).div_(prod.add_(eps))
        ctx.save_for_backward(i, j, c_i, c_j, stats)
        ctx.window, ctx.eps = window, eps
        return cc

    @staticmethod
    def backward(ctx, grad_cc: Tensor):
        i, j, c_i, c_j, stats = ctx.saved_tensors
        need_i, need_j = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_i or need_j):
            return None, None, None, None, None, None
        w = ctx.window
        n = w ** (i.dim() - 2)
        a, b, var_i, var_j, cross = stats.split(1, dim=1)
        g = grad_cc  # d loss / d cc per voxel
        prod = var_i * var_j
        inv = prod.add(ctx.eps).reciprocal_()
        sq = cross * cross
        bounded = sq <= prod
        # cc = min(cross², P) / (P + eps):
        #   d cc / d cross = 2 cross / (P + eps) where cross² <= P, else 0;
        #   d cc / d P = -cc / (P + eps) where cross² <= P, else (1 - cc) / (P + eps).
        d_prod = torch.minimum(sq, prod, out=sq).mul_(inv).neg_().add_(~bounded).mul_(inv).mul_(g)
        del prod, sq
        g_cross = (cross * inv).mul_(g).mul_(2).masked_fill_(~bounded, 0)
        del inv, bounded
        ic, jc = i - c_i, j - c_j
        pad = _PaddedMap(i, w)
        grads = []
        # Per input x (with y the other): var_x = S_x'x' - s_x²/n (no gradient where it was set
        # to 0), cross = S_I'J' - a b / n; d/dx' of (x', x'², x'y') is (1, 2 x', y').
        for need, xc, s_x, s_y, var_x, var_y in ((need_i, ic, a, b, var_i, var_j), (need_j, jc, b, a, var_j, var_i)):
            if not need:
                grads.append(None)
                continue
            g_var = torch.mul(d_prod, var_y, out=pad.inner).masked_fill_(var_x <= 0, 0)
            grad = pad.filter().mul_(xc).mul_(2)
            g_var.mul_(s_x).mul_(2).addcmul_(s_y, g_cross).mul_(-1.0 / n)  # now d/d s_x
            grad.add_(pad.filter())
            grads.append(grad)
        del d_prod
        pad.inner.copy_(g_cross)
        back_cross = pad.filter()
        if need_i:
            grads[0].addcmul_(jc, back_cross)
        if need_j:
            grads[1].addcmul_(ic, back_cross)
        return grads[0], grads[1], None, None, None, None


@LOSSES.register(name="lncc_fast")
class LNCCFast(_LNCCBase):
    """LNCC by separable doubling box filters with an analytic backward (regkit's fast exact
    method; see :class:`_FastLNCCFunction`).

    Like every form here, half-precision inputs are computed in float32 and the result is
    float32.
    """

    def compute(self, i: Tensor, j: Tensor, ndim: int, shift: Optional[Sequence[Tensor]] = None) -> Tensor:
        c_i, c_j = (None, None) if shift is None else shift
        return _FastLNCCFunction.apply(i, j, self.window, self.eps, c_i, c_j)
