"""TransMorph: a 3-D Swin Transformer encoder with a convolutional decoder.

Paper: J. Chen, E. C. Frey, Y. He, W. P. Segars, Y. Li, Y. Du, "TransMorph: Transformer for
unsupervised medical image registration", Medical Image Analysis 82, 2022 (arXiv:2111.10480).
Swin Transformer: Z. Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows", ICCV 2021.
Source: https://github.com/junyuchen245/TransMorph_Transformer_for_Medical_Image_Registration
(``TransMorph/models/TransMorph.py`` and ``configs_TransMorph.py``), read for the architecture only.

Layout (IXI configuration, the registered ``transmorph``'s defaults):

* encoder: 4x4x4 patch embedding (conv, stride 4) to 96 channels + LayerNorm; four Swin stages of
  depths (2, 2, 4, 2) with (4, 4, 8, 8) heads, widths 96, 192, 384, 768, each block window
  attention over (5, 6, 7) windows with a learned relative position bias and a qkv projection
  without bias, alternate blocks shifted by half a window, MLP ratio 4, stochastic depth rising
  linearly from 0 to 0.3 over the 10 blocks; patch merging between stages (LayerNorm of the 8
  neighbours' 8C features, linear 8C -> 2C without bias); a LayerNorm on each stage output;
* conv skips: conv-InstanceNorm-LeakyReLU from the input average-pooled to half resolution
  (48 channels) and from the full-resolution input (16 channels);
* decoder: five blocks of x2 trilinear upsampling, skip concatenation and two 3x3x3 convs without
  bias + InstanceNorm + LeakyReLU, (768 -> 384 -> 192 -> 96 -> 48 -> 16 channels);
* head: a 3x3x3 conv to 3 channels initialised N(0, 1e-5) with zero bias; its output is the
  displacement in voxels with channel k along axis k, as regkit's convention.

The window size is one (D, H, W) triple, (5, 6, 7), used by every stage (the reference's
``config.window_size``); at 160x192x224 the last stage is exactly one window.

Parameter count: 46,771,251 for the defaults, with any input size. The count does not depend on
the image size: no parameter is sized by it (the relative position bias depends on the window
only, and the learned absolute position embedding, which would, is off in TransMorph). The
reference's ``img_size`` only sizes its spatial transformer's grid buffer; regkit has no such
argument because its warping works at any size.

Any input size >= 16 per axis: the base class pads to a multiple of 32 (patch 4 x three
patch-merging halvings) and crops the field back; each Swin block pads its tokens to a multiple
of the window and crops back, as the reference does. 3-D only.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regkit.errors import InputError
from regkit.models.base import RegistrationModel, init_flow_head
from regkit.models.registry import MODELS, ModelInfo

Size3 = Tuple[int, int, int]


class DropPath(nn.Module):
    """Stochastic depth: zero a whole sample's residual branch with probability ``p`` in training,
    scaling the kept ones by ``1 / (1 - p)``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:.4g}"


def window_partition(x: Tensor, window: Size3) -> Tensor:
    """``(B, D, H, W, C)`` with sizes multiples of ``window`` -> ``(B * nW, wd*wh*ww, C)``."""
    B, D, H, W, C = x.shape
    wd, wh, ww = window
    x = x.view(B, D // wd, wd, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, C)


def window_merge(windows: Tensor, window: Size3, batch: int, size: Size3) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, N, C)`` -> ``(B, D, H, W, C)``."""
    (D, H, W), (wd, wh, ww) = size, window
    x = windows.view(batch, D // wd, H // wh, W // ww, wd, wh, ww, -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(batch, D, H, W, -1)


def shifted_window_mask(size: Size3, window: Size3, shift: Size3, device) -> Tensor:
    """``(nW, N, N)`` additive mask (0 or -100) for attention over cyclically shifted windows of a
    grid ``size`` (a multiple of ``window``): tokens that were not neighbours before the roll
    must not attend to each other."""
    region = torch.zeros(1, *size, 1, device=device)
    bounds = [((0, n - w), (n - w, n - s), (n - s, n)) for n, w, s in zip(size, window, shift)]
    label = 0
    for d0, d1 in bounds[0]:
        for h0, h1 in bounds[1]:
            for w0, w1 in bounds[2]:
                region[:, d0:d1, h0:h1, w0:w1] = label
                label += 1
    ids = window_partition(region, window).squeeze(-1)  # (nW, N)
    diff = ids[:, None, :] - ids[:, :, None]
    return diff.masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias.

    ``forward(x, mask)``: x ``(B * nW, N, C)`` with N = prod(window); mask ``(nW, N, N)`` or None.
    """

    def __init__(self, dim: int, window: Size3, heads: int, qkv_bias: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        spans = [2 * w - 1 for w in window]
        self.relative_bias = nn.Parameter(torch.zeros(math.prod(spans), heads))
        nn.init.trunc_normal_(self.relative_bias, std=0.02)
        coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)
        rel = coords[:, :, None] - coords[:, None, :] + torch.tensor([w - 1 for w in window]).view(3, 1, 1)
        index = (rel[0] * spans[1] + rel[1]) * spans[2] + rel[2]  # (N, N) into the bias table
        # Derived from the window alone, so it is rebuilt rather than saved in checkpoints.
        self.register_buffer("relative_index", index, persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        Bn, N, C = x.shape
        q, k, v = self.qkv(x).view(Bn, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_bias[self.relative_index.view(-1)].view(N, N, self.heads).permute(2, 0, 1)
        # softmax(q k^T / sqrt(d) + bias [+ mask]) v. The fused kernel never stores the (N, N)
        # probabilities per window, so it is exact to round-off yet far lighter and faster on a CPU.
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0), scale=self.scale)
        else:
            nW = mask.shape[0]
            split = (Bn // nW, nW, self.heads, N, -1)  # windows are batch-major: (b, window)
            out = F.scaled_dot_product_attention(q.reshape(split), k.reshape(split), v.reshape(split),
                                                 attn_mask=bias + mask[:, None], scale=self.scale)
        return self.proj(out.reshape(Bn, self.heads, N, -1).transpose(1, 2).reshape(Bn, N, C))


class SwinBlock(nn.Module):
    """Pre-norm Swin block: (shifted) window attention and an MLP, each a residual branch.

    ``forward(x, size, mask)``: x ``(B, D*H*W, C)`` on a token grid ``size``; ``mask`` is the
    shifted-window mask of the padded grid (used only when this block is shifted).
    """

    def __init__(self, dim: int, heads: int, window: Size3, shift: Size3, mlp_ratio: float,
                 qkv_bias: bool, drop_path: float) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    @property
    def shifted(self) -> bool:
        return min(self.shift) > 0

    def forward(self, x: Tensor, size: Size3, mask: Optional[Tensor]) -> Tensor:
        B, L, C = x.shape
        D, H, W = size
        y = self.norm1(x).view(B, D, H, W, C)
        pad = [(-n) % w for n, w in zip(size, self.window)]
        y = F.pad(y, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))  # padded tokens are zeros after the norm
        padded = tuple(y.shape[1:4])
        if self.shifted:
            y = torch.roll(y, shifts=tuple(-s for s in self.shift), dims=(1, 2, 3))
        y = self.attn(window_partition(y, self.window), mask if self.shifted else None)
        y = window_merge(y, self.window, B, padded)
        if self.shifted:
            y = torch.roll(y, shifts=self.shift, dims=(1, 2, 3))
        y = y[:, :D, :H, :W].reshape(B, L, C)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Concatenate each 2x2x2 neighbourhood (8C), LayerNorm, project to ``out_dim`` without bias."""

    # The order of the eight neighbours, (d, h, w) offsets, as the reference concatenates them.
    OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1))

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, out_dim, bias=False)

    def forward(self, x: Tensor, size: Size3) -> Tuple[Tensor, Size3]:
        B, _, C = x.shape
        x = x.view(B, *size, C)
        if any(n % 2 for n in size):
            x = F.pad(x, (0, 0, 0, size[2] % 2, 0, size[1] % 2, 0, size[0] % 2))
        x = torch.cat([x[:, a::2, b::2, c::2] for a, b, c in self.OFFSETS], dim=-1)
        out_size = tuple(x.shape[1:4])
        return self.reduction(self.norm(x.reshape(B, -1, 8 * C))), out_size


class SwinStage(nn.Module):
    """``depth`` Swin blocks (every second one shifted), then optional patch merging.

    Returns the stage output (B, L, C) on ``size`` and the merged tokens with their size.
    """

    def __init__(self, dim: int, depth: int, heads: int, window: Size3, mlp_ratio: float,
                 qkv_bias: bool, drop_paths: Sequence[float], merge_to: Optional[int]) -> None:
        super().__init__()
        self.window = window
        self.shift = tuple(w // 2 for w in window)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, window, self.shift if i % 2 else (0, 0, 0), mlp_ratio, qkv_bias,
                      drop_paths[i])
            for i in range(depth)
        )
        self.merge = PatchMerging(dim, merge_to) if merge_to else None

    def forward(self, x: Tensor, size: Size3):
        mask = None
        if any(block.shifted for block in self.blocks):
            padded = tuple(math.ceil(n / w) * w for n, w in zip(size, self.window))
            mask = shifted_window_mask(padded, self.window, self.shift, x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x, size, mask)
        if self.merge is None:
            return x, x, size
        merged, merged_size = self.merge(x, size)
        return x, merged, merged_size


class SwinEncoder(nn.Module):
    """Patch embedding + Swin stages; ``forward(x)`` returns each stage's normalised output as a
    ``(B, C_i, D_i, H_i, W_i)`` map, finest first."""

    def __init__(self, in_channels: int, embed_dim: int, depths: Sequence[int], heads: Sequence[int],
                 window: Size3, patch_size: int, mlp_ratio: float, qkv_bias: bool,
                 drop_path_rate: float) -> None:
        super().__init__()
        self.patch_embed = nn.Conv3d(in_channels, embed_dim, patch_size, patch_size)
        self.embed_norm = nn.LayerNorm(embed_dim)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        widths = [embed_dim * 2 ** i for i in range(len(depths))]
        self.stages = nn.ModuleList()
        for i, (dim, depth, h) in enumerate(zip(widths, depths, heads)):
            first = sum(depths[:i])
            merge_to = widths[i + 1] if i + 1 < len(depths) else None
            self.stages.append(SwinStage(dim, depth, h, window, mlp_ratio, qkv_bias,
                                         rates[first:first + depth], merge_to))
        self.out_norms = nn.ModuleList(nn.LayerNorm(w) for w in widths)

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.patch_embed(x)
        B, C = x.shape[:2]
        size = tuple(x.shape[2:])
        x = self.embed_norm(x.flatten(2).transpose(1, 2))
        outs = []
        for stage, norm in zip(self.stages, self.out_norms):
            y, x, next_size = stage(x, size)
            outs.append(norm(y).view(B, *size, -1).permute(0, 4, 1, 2, 3).contiguous())
            size = next_size
        return outs


class ConvNormAct(nn.Sequential):
    """3x3x3 conv without bias + InstanceNorm (no affine) + LeakyReLU(0.01), in place as in the
    reference: at full resolution that saves one feature map per block."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv3d(cin, cout, 3, 1, 1, bias=False), nn.InstanceNorm3d(cout),
                         nn.LeakyReLU(0.01, inplace=True))


class DecoderBlock(nn.Module):
    """x2 trilinear upsampling, skip concatenation, two :class:`ConvNormAct`."""

    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(ConvNormAct(cin + skip, cout), ConvNormAct(cout, cout))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


class TransMorph(RegistrationModel):
    """TransMorph (3-D only). The four defining options have no defaults here; the registered
    ``transmorph`` gives the IXI configuration.

    Args:
        embed_dim: channels after patch embedding; stage i has ``embed_dim * 2**i``.
        depths: Swin blocks per stage.
        num_heads: attention heads per stage (each must divide its stage's width).
        window_size: (D, H, W) attention window, shared by all stages.
        mlp_ratio: MLP hidden width / block width.
        qkv_bias: learn a bias in the qkv projection (TransMorph: no).
        drop_path_rate: final stochastic-depth rate (linear from 0 over all blocks).
        reg_head_chan: channels of the full-resolution conv skip and of the last decoder block.
        **kwargs: :class:`RegistrationModel` options (diffeomorphic, ...); ndim must be 3.

    The patch size is 4 (the two conv skips restore exactly that factor). ``predict_field`` maps
    ``(B, 2*in_channels, D, H, W)``, each size a multiple of ``4 * 2**(len(depths) - 1)``, to a
    displacement ``(B, 3, D, H, W)`` in voxels.
    """

    supported_ndims = (3,)
    PATCH = 4  # fixed: the decoder's two conv skips restore exactly x4 resolution

    def __init__(self, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int],
                 window_size: Sequence[int], mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop_path_rate: float = 0.3, reg_head_chan: int = 16, **kwargs) -> None:
        ndim = kwargs.get("ndim", 3)
        if ndim != 3:
            raise InputError(
                f"TransMorph is 3-D only (3-D Swin windows and patch merging), got ndim={ndim}; "
                "for 2-D use vxm1, vxm2, lkunet, lkunet16, lkunet4 or student"
            )
        super().__init__(**kwargs)
        depths, num_heads = [int(d) for d in depths], [int(h) for h in num_heads]
        window = tuple(int(w) for w in window_size)
        if len(window) != 3 or min(window) < 1:
            raise InputError(
                f"TransMorph: window_size must be three sizes >= 1 (D, H, W), got {tuple(window_size)}"
            )
        if len(depths) < 2 or len(num_heads) != len(depths) or min(depths) < 1:
            raise InputError(
                f"TransMorph: depths (>= 2 stages, each >= 1) and num_heads must have the same length, "
                f"got depths={tuple(depths)}, num_heads={tuple(num_heads)}"
            )
        bad = [(embed_dim * 2 ** i, h) for i, h in enumerate(num_heads) if h < 1 or (embed_dim * 2 ** i) % h]
        if bad:
            raise InputError(
                f"TransMorph: each stage width must be divisible by its heads, got (width, heads) {bad}"
            )
        if embed_dim < 2 or embed_dim % 2 or reg_head_chan < 1 or not 0 <= drop_path_rate < 1:
            raise InputError(
                f"TransMorph: need an even embed_dim >= 2, reg_head_chan >= 1 and 0 <= drop_path_rate < 1, "
                f"got {embed_dim}, {reg_head_chan}, {drop_path_rate}"
            )
        self.size_multiple = self.PATCH * 2 ** (len(depths) - 1)
        cin = 2 * self.in_channels
        self.encoder = SwinEncoder(cin, embed_dim, depths, num_heads, window, self.PATCH, mlp_ratio,
                                   qkv_bias, drop_path_rate)
        self.skip_half = ConvNormAct(cin, embed_dim // 2)
        self.skip_full = ConvNormAct(cin, reg_head_chan)
        widths = [embed_dim * 2 ** i for i in range(len(depths))]
        self.decoder = nn.ModuleList(DecoderBlock(widths[i + 1], widths[i], widths[i])
                                     for i in reversed(range(len(depths) - 1)))
        self.decoder.append(DecoderBlock(embed_dim, embed_dim // 2, embed_dim // 2))
        self.decoder.append(DecoderBlock(embed_dim // 2, reg_head_chan, reg_head_chan))
        self.flow_head = nn.Conv3d(reg_head_chan, 3, 3, 1, 1)
        init_flow_head(self.flow_head)

    def predict_field(self, x: Tensor) -> Tensor:
        features = self.encoder(x)  # 1/4, 1/8, ... resolution, finest first
        # Skips for the decoder, coarsest first: the Swin stages, then the two conv skips.
        skips = features[-2::-1] + [self.skip_half(F.avg_pool3d(x, 3, stride=2, padding=1)), self.skip_full(x)]
        y = features[-1]
        for block, skip in zip(self.decoder, skips):
            y = block(y, skip)
        return self.flow_head(y)


@MODELS.register(defaults=dict(embed_dim=96, depths=(2, 2, 4, 2), num_heads=(4, 4, 8, 8), window_size=(5, 6, 7)),
                 info=ModelInfo("TransMorph: 3-D Swin encoder (embed 96, depths 2-2-4-2), conv decoder",
                                "Chen et al., TransMorph, MedIA 2022",
                                "TransMorph repository, TransMorph/models/TransMorph.py, configs_TransMorph.py",
                                params=46_771_251, reference_params=46_771_251))
def transmorph(**kwargs) -> TransMorph:
    return TransMorph(**kwargs)
