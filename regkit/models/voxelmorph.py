"""VoxelMorph-1 and VoxelMorph-2, as used as baselines on IXI.

Paper: G. Balakrishnan, A. Zhao, M. R. Sabuncu, J. Guttag, A. V. Dalca, "VoxelMorph: a learning
framework for deformable medical image registration", IEEE TMI 38(8), 2019.
Source of the IXI baseline definition: the TransMorph repository's
``IXI/Baseline_registration_methods/VoxelMorph/models.py`` (``VxmDense_1``/``VxmDense_2``), which
uses the older VoxelMorph U-Net with a stride-2 convolutional encoder.

Layout (c = channels, every conv 3x3(x3) + LeakyReLU(0.2)):
encoder: len(enc) stride-2 convs. decoder: for each encoder level a conv, x2 nearest upsample and
concatenation with the matching encoder activation (the last one with the 2-channel input),
then the remaining decoder convs at full resolution, then a 3x3(x3) flow conv initialised
N(0, 1e-5). The variants' widths, reference counts and metadata are on their registrations below.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from regkit.errors import InputError
from regkit.models.base import RegistrationModel, conv_nd, init_flow_head
from regkit.models.registry import MODELS, ModelInfo


class ConvAct(nn.Sequential):
    """3x3(x3) convolution + LeakyReLU(0.2)."""

    def __init__(self, ndim: int, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(conv_nd(ndim)(cin, cout, 3, stride, 1), nn.LeakyReLU(0.2))


class VoxelMorph(RegistrationModel):
    """VoxelMorph U-Net with a stride-2 encoder. The widths have no defaults here: each
    registered variant (``vxm1``, ``vxm2``) gives its own.

    Args:
        enc_channels: encoder widths, one stride-2 conv each.
        dec_channels: decoder widths; the first ``len(enc_channels)`` are followed by upsampling
            and a skip concatenation, the rest are full-resolution convs.
        **kwargs: :class:`RegistrationModel` options (ndim, diffeomorphic, ...).
    """

    def __init__(self, enc_channels: Sequence[int], dec_channels: Sequence[int], **kwargs) -> None:
        super().__init__(**kwargs)
        enc, dec = [int(c) for c in enc_channels], [int(c) for c in dec_channels]
        if len(dec) < len(enc):
            raise InputError(
                f"dec_channels needs at least len(enc_channels)={len(enc)} entries, got {len(dec)}"
            )
        self.size_multiple = 2 ** len(enc)
        nd, cin = self.ndim, 2 * self.in_channels
        self.encoder = nn.ModuleList()
        prev = cin
        for c in enc:
            self.encoder.append(ConvAct(nd, prev, c, stride=2))
            prev = c
        skips = [cin] + enc[:-1]  # what gets concatenated after each upsampling, deepest first reversed
        self.decoder = nn.ModuleList()
        for i, c in enumerate(dec[: len(enc)]):
            self.decoder.append(ConvAct(nd, prev, c))
            prev = c + skips[len(enc) - 1 - i]
        self.extras = nn.ModuleList()
        for c in dec[len(enc):]:
            self.extras.append(ConvAct(nd, prev, c))
            prev = c
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.flow_head = conv_nd(nd)(prev, nd, 3, padding=1)
        init_flow_head(self.flow_head)

    def predict_field(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.encoder:
            features.append(layer(features[-1]))
        y = features.pop()
        for layer in self.decoder:
            y = torch.cat([self.upsample(layer(y)), features.pop()], dim=1)
        for layer in self.extras:
            y = layer(y)
        return self.flow_head(y)


PAPER = "Balakrishnan et al., VoxelMorph, IEEE TMI 2019"
SOURCE = "TransMorph repository, IXI/Baseline_registration_methods/VoxelMorph/models.py"


@MODELS.register(defaults=dict(enc_channels=(8, 32, 32, 32), dec_channels=(32, 32, 32, 32, 32, 8, 8)),
                 info=ModelInfo("VoxelMorph-1, IXI baseline `VxmDense_1` (stride-2 encoder 8-32-32-32)",
                                PAPER, SOURCE, params=274_387, reference_params=274_387))
def vxm1(**kwargs) -> VoxelMorph:
    return VoxelMorph(**kwargs)


@MODELS.register(defaults=dict(enc_channels=(16, 32, 32, 32), dec_channels=(32, 32, 32, 32, 32, 16, 16)),
                 info=ModelInfo("VoxelMorph-2, IXI baseline `VxmDense_2` (stride-2 encoder 16-32-32-32)",
                                PAPER, SOURCE, params=301_411, reference_params=301_411))
def vxm2(**kwargs) -> VoxelMorph:
    return VoxelMorph(**kwargs)
