"""LKU-Net: a U-Net with large-kernel blocks, and its diffeomorphic variant LKU-Net-diff.

Paper: X. Jia, J. Bartlett, T. Zhang, W. Lu, Z. Qiu, J. Duan, "U-Net vs Transformer: Is U-Net
Outdated in Medical Image Registration?", MLMI 2022 (arXiv:2208.04939).
Source: https://github.com/xi-jia/LKU-Net (``Models.py``: ``UNet``, ``LK_encoder``), read for the
architecture only.

Layout (c = start channels, every conv with bias, every activation a one-parameter PReLU):
input conv and first conv 3x3(x3) to c; four stride-2 3x3(x3) convs to 2c, 4c, 8c, 8c, each
followed by a large-kernel block (the sum of parallel kxk(xk), 3x3(x3) and 1x1(x1) convs plus the
identity, then PReLU). Decoder: four 2x2(x2) stride-2 transposed convs + PReLU, each followed by a
skip concatenation and two 3x3(x3) convs (16c->8c->4c, 8c->4c->2c, 4c->4c->2c, 3c->2c->2c). Head: a
3x3(x3) conv without bias to ndim channels, then Softsign.

Units. The reference head's Softsign output is a displacement in grid_sample's normalised
coordinates (align_corners=True: -1 and 1 are the first and last voxel centres), with channel k
along spatial axis k (the reference reverses the order only when it builds grid_sample's grid).
One normalised unit along an axis of n voxels is (n - 1) / 2 voxels, so regkit multiplies channel
k by (n_k - 1) / 2, with n_k the size of the (padded) grid the network sees. That is exactly the
reference's displacement on that grid, so the Softsign bound is half the padded extent per axis.
Scaling and squaring commutes with this per-axis scaling, so LKU-Net-diff's integration in
normalised units (flow / 2**7, then 7 x (flow + warp(flow, flow))) equals regkit's integration in
voxels.

Differences from the reference, all deliberate:

* the reference defines a second output conv (``dc10``) that ``forward`` never calls; regkit does
  not build it. Counts (3-D, c, k=5): 522,302 / 2,086,342 / 8,339,702 for c = 4 / 8 / 16; with the
  unused conv (:meth:`LKUNet.unused_reference_parameters`) 522,950 / 2,087,638 / 8,342,294;
* the head conv is initialised N(0, 1e-5) (the reference uses PyTorch's default), so training
  starts at the identity like VoxelMorph and TransMorph;
* any size >= 16 per axis (padded to a multiple of 16 and cropped back), and 2-D.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regkit.errors import InputError
from regkit.models.base import RegistrationModel, conv_nd, conv_transpose_nd, init_flow_head
from regkit.models.registry import MODELS, ModelInfo


class ConvPReLU(nn.Sequential):
    """3x3(x3) convolution (stride 1 or 2) + PReLU."""

    def __init__(self, ndim: int, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(conv_nd(ndim)(cin, cout, 3, stride, 1), nn.PReLU())


class LargeKernelBlock(nn.Module):
    """PReLU(conv_k(x) + conv_3(x) + conv_1(x) + x), channels and size kept."""

    def __init__(self, ndim: int, channels: int, kernel: int) -> None:
        super().__init__()
        conv = conv_nd(ndim)
        self.large = conv(channels, channels, kernel, 1, kernel // 2)
        self.regular = conv(channels, channels, 3, 1, 1)
        self.one = conv(channels, channels, 1, 1, 0)
        self.act = nn.PReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.large(x) + self.regular(x) + self.one(x) + x)


class UpPReLU(nn.Sequential):
    """2x2(x2) stride-2 transposed convolution + PReLU (doubles each spatial size)."""

    def __init__(self, ndim: int, channels: int) -> None:
        super().__init__(conv_transpose_nd(ndim)(channels, channels, 2, 2), nn.PReLU())


class LKUNet(RegistrationModel):
    """LKU-Net (``start_channels``, ``large_kernel``); each registered variant gives both (an
    override such as ``large_kernel=7``, the 2-D reference's, wins).

    Args:
        start_channels: c, the width of the first level (4, 8 and 16 in the paper).
        large_kernel: odd size of the large kernel (5 in 3-D in the paper).
        **kwargs: :class:`RegistrationModel` options (ndim 2 or 3, diffeomorphic, ...).

    ``predict_field`` maps ``(B, 2*in_channels, *spatial)`` (each size a multiple of 16) to a
    displacement ``(B, ndim, *spatial)`` in voxels, bounded by half the grid's extent per axis.
    """

    size_multiple = 16

    def __init__(self, start_channels: int, large_kernel: int, **kwargs) -> None:
        super().__init__(**kwargs)
        c, k = int(start_channels), int(large_kernel)
        if c < 1:
            raise InputError(f"LKUNet: start_channels must be >= 1, got {start_channels}")
        if k < 1 or k % 2 == 0:
            raise InputError(f"LKUNet: large_kernel must be odd and >= 1 (size-preserving), got {large_kernel}")
        self.start_channels, self.large_kernel = c, k
        nd = self.ndim
        self.stem = nn.Sequential(ConvPReLU(nd, 2 * self.in_channels, c), ConvPReLU(nd, c, c))
        widths = [c, 2 * c, 4 * c, 8 * c, 8 * c]
        self.down = nn.ModuleList(
            nn.Sequential(ConvPReLU(nd, widths[i], widths[i + 1], stride=2),
                          LargeKernelBlock(nd, widths[i + 1], k))
            for i in range(4)
        )
        # (upsampled width, skip width, conv1 out, conv2 out), deepest level first.
        levels = [(8 * c, 8 * c, 8 * c, 4 * c), (4 * c, 4 * c, 4 * c, 2 * c),
                  (2 * c, 2 * c, 4 * c, 2 * c), (2 * c, c, 2 * c, 2 * c)]
        self.up = nn.ModuleList(UpPReLU(nd, u) for u, _, _, _ in levels)
        self.dec = nn.ModuleList(
            nn.Sequential(ConvPReLU(nd, u + s, c1), ConvPReLU(nd, c1, c2)) for u, s, c1, c2 in levels
        )
        self.flow_head = conv_nd(nd)(2 * c, nd, 3, 1, 1, bias=False)
        init_flow_head(self.flow_head)

    def predict_field(self, x: Tensor) -> Tensor:
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(skips[-1]))
        y = skips.pop()
        for up, dec in zip(self.up, self.dec):
            y = dec(torch.cat([up(y), skips.pop()], dim=1))
        normalised = F.softsign(self.flow_head(y))
        return normalised * self.normalised_to_voxels(normalised.shape[2:], normalised)

    @staticmethod
    def normalised_to_voxels(shape, like: Tensor) -> Tensor:
        """``(1, ndim, 1, ...)`` factors (n_k - 1) / 2: voxels per normalised (align_corners) unit."""
        nd = len(shape)
        return torch.tensor([(n - 1) / 2.0 for n in shape], dtype=like.dtype,
                            device=like.device).view(1, nd, *([1] * nd))

    def unused_reference_parameters(self) -> int:
        """Parameters of the reference's second, never-called output conv (``dc10``), which regkit
        does not build; adding them to :meth:`num_parameters` gives the reference code's count."""
        unused = conv_nd(self.ndim)(2 * self.start_channels, self.ndim, 3, 1, 1, bias=False)
        return sum(p.numel() for p in unused.parameters())


PAPER = "Jia et al., U-Net vs Transformer, MLMI 2022"
SOURCE = "github.com/xi-jia/LKU-Net, Models.py"
UNUSED_CONV = "with the reference's unused output conv"


@MODELS.register(defaults=dict(start_channels=8, large_kernel=5),
                 info=ModelInfo("LKU-Net (8, 5): start channels 8, large kernel 5", PAPER, SOURCE,
                                params=2_086_342, reference_params=2_087_638, reference_note=UNUSED_CONV))
def lkunet(**kwargs) -> LKUNet:
    return LKUNet(**kwargs)


@MODELS.register(defaults=dict(start_channels=16, large_kernel=5),
                 info=ModelInfo("LKU-Net (16, 5)", PAPER, SOURCE,
                                params=8_339_702, reference_params=8_342_294, reference_note=UNUSED_CONV))
def lkunet16(**kwargs) -> LKUNet:
    return LKUNet(**kwargs)


@MODELS.register(defaults=dict(start_channels=4, large_kernel=5),
                 info=ModelInfo("LKU-Net (4, 5), the light LKU-Net", PAPER, SOURCE,
                                params=522_302, reference_params=522_950, reference_note=UNUSED_CONV))
def lkunet4(**kwargs) -> LKUNet:
    return LKUNet(**kwargs)


@MODELS.register(defaults=dict(start_channels=8, large_kernel=5, diffeomorphic=True),
                 info=ModelInfo("LKU-Net-diff (8, 5): `lkunet` integrating a stationary velocity field "
                                "(7 scaling-and-squaring steps)", PAPER, SOURCE,
                                params=2_086_342, reference_params=2_087_638, reference_note=UNUSED_CONV))
def lkunet_diff(**kwargs) -> LKUNet:
    return LKUNet(**kwargs)
