"""Discriminator on deformation fields for adversarial distillation (ALDK).

Paper: M.-Q. Tran, T. Do, H. Tran, E. Tjiputra, Q. D. Tran, A. Nguyen, "Light-weight Deformable
Registration using Adversarial Learning with Distilling Knowledge", IEEE TMI 2022
(arXiv:2110.01293). Source read for facts: github.com/aioz-ai/LDR_ALDK
(``network/recursive_cascaded_networks.py``: widths 16..256, a linear layer and a sigmoid).

The paper describes 3-D convolutions of kernel 4 and stride 2 with 16 -> 256 channels and ReLU,
and a sigmoid at the end. The public code flattens the last feature map into a linear layer,
which ties the network to one input size; here the last feature map is averaged over space
before the linear layer, so the discriminator accepts any training size >= 32 per axis.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from regkit.errors import InputError


class FlowDiscriminator(nn.Module):
    """``D(flow) -> (B, 1)`` in (0, 1): how teacher-like a deformation looks.

    Args:
        ndim: 2 or 3 (the flow has ``ndim`` channels).
        channels: widths of the stride-2 convolutions.
        kernel_size: 4 as in the paper (padding 1 halves each size exactly).
        negative_slope: 0 gives ReLU (the paper); > 0 a LeakyReLU.
    Input: flow ``(B, ndim, *spatial)`` in voxels, every spatial size >= 2**len(channels).
    """

    def __init__(self, ndim: int = 3, channels: Sequence[int] = (16, 32, 64, 128, 256), kernel_size: int = 4,
                 negative_slope: float = 0.0) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise InputError(f"FlowDiscriminator: ndim must be 2 or 3, got {ndim}")
        if not channels:
            raise InputError("FlowDiscriminator: channels must not be empty")
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        layers, prev = [], ndim
        for c in channels:
            layers += [conv(prev, int(c), kernel_size, stride=2, padding=(kernel_size - 2) // 2),
                       nn.LeakyReLU(negative_slope) if negative_slope > 0 else nn.ReLU()]
            prev = int(c)
        self.ndim = ndim
        self.min_size = 2 ** len(channels)
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(prev, 1)

    def forward(self, flow: Tensor) -> Tensor:
        if flow.dim() != self.ndim + 2 or flow.shape[1] != self.ndim:
            raise InputError(f"FlowDiscriminator expects a flow (B, {self.ndim}, *spatial), got {tuple(flow.shape)}")
        if min(flow.shape[2:]) < self.min_size:
            raise InputError(
                f"FlowDiscriminator needs every spatial size >= {self.min_size}, got {tuple(flow.shape[2:])}"
            )
        x = self.features(flow)
        return torch.sigmoid(self.head(x.flatten(2).mean(-1)))
