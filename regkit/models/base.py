"""What every regkit registration network shares.

A subclass only implements :meth:`RegistrationModel.predict_field`, mapping the concatenated,
padded pair to a field in voxels. The base class validates the inputs, pads any size to the
network's multiple and crops back, optionally integrates the field as a stationary velocity
(scaling and squaring), and warps the moving image. Everything returns one typed
:class:`RegistrationOutput`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regkit.errors import InputError
from regkit.spatial import SpatialTransformer, integrate_velocity


@dataclass
class RegistrationOutput:
    """What a model returns.

    Attributes:
        warped: moving image resampled onto the fixed grid, ``(B, C, *spatial)``.
        flow: displacement ``(B, ndim, *spatial)`` in voxels, channel k along spatial axis k;
            ``warped = warp(moving, flow)``.
        velocity: the stationary velocity field the flow was integrated from (diffeomorphic
            models), otherwise ``None``. Smoothness regularisers act on it when present.
        stage_fields: for a cascade (``model.cascades=n``), each stage's own field (its
            velocity or flow, on the fixed grid), which smoothness terms regularise stage by
            stage; ``None`` for a single network.
    """

    warped: Tensor
    flow: Tensor
    velocity: Optional[Tensor] = None
    stage_fields: Optional[List[Tensor]] = None

    @property
    def field(self) -> Tensor:
        """The field a smoothness term should act on: the velocity if any, else the flow."""
        return self.velocity if self.velocity is not None else self.flow


def build_transformer(transformer: Union[None, dict, SpatialTransformer]) -> SpatialTransformer:
    if transformer is None:
        return SpatialTransformer()
    if isinstance(transformer, SpatialTransformer):
        return transformer
    if isinstance(transformer, dict) or hasattr(transformer, "items"):
        spec = {k: v for k, v in dict(transformer).items() if k != "_target_"}
        return SpatialTransformer(**spec)
    raise InputError(f"transformer must be a SpatialTransformer or a dict of its options, got {type(transformer).__name__}")


def pad_to_multiple(x: Tensor, multiple: int) -> Tuple[Tensor, Tuple[int, ...]]:
    """Zero-pad the spatial dims at their high end up to a multiple; returns the original sizes."""
    sizes = tuple(x.shape[2:])
    extra = [(-s) % multiple for s in sizes]
    if not any(extra):
        return x, sizes
    pad = []
    for e in reversed(extra):  # F.pad lists the last dim first
        pad += [0, e]
    return F.pad(x, pad), sizes


def crop_to(x: Tensor, sizes: Sequence[int]) -> Tensor:
    if tuple(x.shape[2:]) == tuple(sizes):
        return x
    return x[(slice(None), slice(None)) + tuple(slice(0, s) for s in sizes)]


class RegistrationModel(nn.Module):
    """Base class: ``model(moving, fixed) -> RegistrationOutput``.

    Args:
        ndim: 2 or 3 spatial dimensions.
        in_channels: channels of each of moving and fixed (the network sees ``2 * in_channels``).
        diffeomorphic: integrate the predicted field as a stationary velocity field.
        int_steps: scaling-and-squaring steps (7 as in VoxelMorph and LKU-Net-diff).
        int_downsize: integrate on a grid this many times coarser (2 = half resolution).
        transformer: the :class:`SpatialTransformer` (or a dict of its options) that warps the
            moving image.

    Subclasses set ``size_multiple`` (their total down-sampling factor), ``min_size`` and
    ``supported_ndims``, and implement :meth:`predict_field`.
    """

    size_multiple: int = 16
    min_size: int = 16
    supported_ndims: Tuple[int, ...] = (2, 3)

    def __init__(self, ndim: int = 3, in_channels: int = 1, diffeomorphic: bool = False,
                 int_steps: int = 7, int_downsize: int = 1,
                 transformer: Union[None, dict, SpatialTransformer] = None) -> None:
        super().__init__()
        if ndim not in self.supported_ndims:
            raise InputError(
                f"{type(self).__name__} supports ndim in {self.supported_ndims}, got ndim={ndim}"
            )
        if in_channels < 1:
            raise InputError(f"in_channels must be >= 1, got {in_channels}")
        if diffeomorphic and int_steps < 1:
            raise InputError(f"diffeomorphic models need int_steps >= 1, got {int_steps}")
        self.ndim = ndim
        self.in_channels = in_channels
        self.diffeomorphic = bool(diffeomorphic)
        self.int_steps = int(int_steps)
        self.int_downsize = int(int_downsize)
        self.transformer = build_transformer(transformer)

    # -- to implement -------------------------------------------------------------------------
    def predict_field(self, x: Tensor) -> Tensor:
        """``(B, 2*in_channels, *spatial)`` padded to ``size_multiple`` -> ``(B, ndim, *spatial)`` voxels."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    def check_inputs(self, moving: Tensor, fixed: Tensor) -> None:
        expected = f"(B, {self.in_channels}, " + ", ".join(["D", "H", "W"][-self.ndim:]) + ")"
        for name, t in (("moving", moving), ("fixed", fixed)):
            if not isinstance(t, Tensor):
                raise InputError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.dim() != self.ndim + 2 or t.shape[1] != self.in_channels:
                raise InputError(f"{name} must be {expected}, got {tuple(t.shape)}")
        if moving.shape != fixed.shape:
            raise InputError(
                f"moving and fixed must have the same shape, got moving {tuple(moving.shape)} "
                f"and fixed {tuple(fixed.shape)}"
            )
        small = [s for s in moving.shape[2:] if s < self.min_size]
        if small:
            raise InputError(
                f"{type(self).__name__} needs every spatial size >= {self.min_size}, got "
                f"{tuple(moving.shape[2:])}"
            )

    def forward(self, moving: Tensor, fixed: Tensor) -> RegistrationOutput:
        """Register ``moving`` to ``fixed``, both ``(B, in_channels, *spatial)``."""
        self.check_inputs(moving, fixed)
        x, sizes = pad_to_multiple(torch.cat([moving, fixed], dim=1), self.size_multiple)
        field = crop_to(self.predict_field(x), sizes)
        if field.dtype in (torch.float16, torch.bfloat16):
            # Under autocast the network body runs in half precision, but the field must not:
            # bfloat16 rounds positions between voxel 128 and 256 to whole voxels. Integration
            # and warping are float32.
            field = field.float()
        if self.diffeomorphic:
            flow = integrate_velocity(field, self.int_steps, self.int_downsize)
            velocity = field
        else:
            flow, velocity = field, None
        return RegistrationOutput(warped=self.transformer(moving, flow), flow=flow, velocity=velocity)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def conv_nd(ndim: int):
    return {2: nn.Conv2d, 3: nn.Conv3d}[ndim]


def conv_transpose_nd(ndim: int):
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[ndim]


def init_flow_head(conv: nn.Module, std: float = 1e-5) -> None:
    """N(0, std) weights and zero bias, so training starts at (nearly) the identity."""
    nn.init.normal_(conv.weight, mean=0.0, std=std)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
