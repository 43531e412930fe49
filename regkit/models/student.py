"""The light-weight student network of LDR-ALDK.

Paper: M. Q. Tran, T. Do, H. Tran, E. Tjiputra, Q. D. Tran, A. Nguyen, "Light-weight Deformable
Registration using Adversarial Learning with Distilling Knowledge", IEEE TMI 41(6), 2022
(arXiv:2110.01293). Source: https://github.com/aioz-ai/LDR_ALDK (TensorFlow 1), read for facts
only; its released student differs from the paper (3x3x3 convs, upsampling instead of
transposed convs), and regkit follows the paper.

The paper's description: four 4x4x4 stride-2 convolutions with 16, 32, 64 and 128 channels and
ReLU; three transposed convolutions with skip concatenation; a 3-channel flow at input size.
Built here as (c = channels of the four levels, sizes for a D x H x W input):

    e1 = ReLU(conv4 s2 (2 -> 16))            D/2     e3 = ReLU(conv4 s2 (32 -> 64))    D/8
    e2 = ReLU(conv4 s2 (16 -> 32))           D/4     e4 = ReLU(conv4 s2 (64 -> 128))   D/16
    y3 = [ReLU(deconv4 s2 (128 -> 64)), e3]  D/8  (128 channels)
    y2 = [ReLU(deconv4 s2 (128 -> 32)), e2]  D/4  (64 channels)
    y1 = [ReLU(deconv4 s2 (64 -> 16)),  e1]  D/2  (32 channels)
    flow = deconv4 s2 (32 -> ndim)           D    (no activation)

Details the paper leaves open, decided here:

* padding 1 on every 4x4x4 (transposed) conv, so each exactly halves or doubles an even size;
* convs carry a bias, transposed convs do not (as the authors' TensorFlow building blocks);
* the flow at input size comes from a fourth transposed conv on the last skip concatenation (as
  the authors' code's final ``upsamp1to0`` layer), in voxels, initialised N(0, 1e-5) so training
  starts at the identity (regkit's convention for every flow head).

1,548,528 parameters in 3-D (regkit's own build; no reference count exists). Any size >= 16 per
axis (padded to a multiple of 16), 2-D as well.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from regkit.errors import InputError
from regkit.models.base import RegistrationModel, conv_nd, conv_transpose_nd, init_flow_head
from regkit.models.registry import MODELS, ModelInfo


class DownReLU(nn.Sequential):
    """4x4(x4) stride-2 convolution (halves each even size) + ReLU."""

    def __init__(self, ndim: int, cin: int, cout: int) -> None:
        super().__init__(conv_nd(ndim)(cin, cout, 4, 2, 1), nn.ReLU())


class UpReLU(nn.Sequential):
    """4x4(x4) stride-2 transposed convolution without bias (doubles each size) + ReLU."""

    def __init__(self, ndim: int, cin: int, cout: int) -> None:
        super().__init__(conv_transpose_nd(ndim)(cin, cout, 4, 2, 1, bias=False), nn.ReLU())


class Student(RegistrationModel):
    """LDR-ALDK's light-weight student (``channels``: given by the registered ``student``).

    Args:
        channels: widths of the stride-2 encoder levels (the paper: 16, 32, 64, 128); the
            decoder mirrors them, one transposed conv per level but the deepest.
        **kwargs: :class:`RegistrationModel` options (ndim 2 or 3, diffeomorphic, ...).

    ``predict_field`` maps ``(B, 2*in_channels, *spatial)`` (each a multiple of
    ``2**len(channels)``) to a displacement ``(B, ndim, *spatial)`` in voxels.
    """

    def __init__(self, channels: Sequence[int], **kwargs) -> None:
        super().__init__(**kwargs)
        widths = [int(c) for c in channels]
        if len(widths) < 2 or min(widths) < 1:
            raise InputError(f"Student: channels needs >= 2 levels, each >= 1, got {tuple(channels)}")
        self.size_multiple = 2 ** len(widths)
        nd = self.ndim
        ins = [2 * self.in_channels] + widths[:-1]
        self.encoder = nn.ModuleList(DownReLU(nd, cin, cout) for cin, cout in zip(ins, widths))
        self.decoder = nn.ModuleList()
        prev = widths[-1]
        for skip in reversed(widths[:-1]):
            self.decoder.append(UpReLU(nd, prev, skip))
            prev = 2 * skip  # the upsampled features and the skip, concatenated
        self.flow_head = conv_transpose_nd(nd)(prev, nd, 4, 2, 1, bias=False)
        init_flow_head(self.flow_head)

    def predict_field(self, x: Tensor) -> Tensor:
        skips = []
        for layer in self.encoder:
            x = layer(x)
            skips.append(x)
        y = skips.pop()
        for layer in self.decoder:
            y = torch.cat([layer(y), skips.pop()], dim=1)
        return self.flow_head(y)


@MODELS.register(defaults=dict(channels=(16, 32, 64, 128)),
                 info=ModelInfo("LDR-ALDK light-weight student (4x4x4 stride-2 convs 16-32-64-128)",
                                "Tran et al., LDR-ALDK, IEEE TMI 2022", "github.com/aioz-ai/LDR_ALDK (TensorFlow 1)",
                                params=1_548_528, reference_params=None,
                                reference_note="none: regkit's build of the paper's description"))
def student(**kwargs) -> Student:
    return Student(**kwargs)
