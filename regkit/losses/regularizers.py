"""Smoothness regularisers on a displacement (or velocity) field ``(B, ndim, *spatial)``."""
from __future__ import annotations

from torch import Tensor, nn

from regkit.errors import InputError
from regkit.losses.registry import LOSSES


def check_field(flow: Tensor, name: str) -> int:
    if not isinstance(flow, Tensor):
        raise InputError(f"{name}: flow must be a tensor, got {type(flow).__name__}")
    ndim = flow.dim() - 2
    if ndim not in (2, 3) or flow.shape[1] != ndim:
        raise InputError(
            f"{name}: flow must be (B, ndim, *spatial) with ndim 2 or 3, got shape {tuple(flow.shape)}"
        )
    return ndim


def forward_differences(flow: Tensor):
    """One forward difference per spatial axis (shapes shrink by one along that axis)."""
    ndim = flow.dim() - 2
    return [flow.narrow(2 + d, 1, flow.shape[2 + d] - 1) - flow.narrow(2 + d, 0, flow.shape[2 + d] - 1)
            for d in range(ndim)]


class Grad(nn.Module):
    """Diffusion regulariser: mean over axes of the mean squared (l2) or absolute (l1)
    forward difference, as ``Grad3d`` in VoxelMorph/TransMorph."""

    inputs = "flow"

    def __init__(self, penalty: str = "l2") -> None:
        super().__init__()
        if penalty not in ("l1", "l2"):
            raise InputError(f"Grad: penalty must be 'l1' or 'l2', got {penalty!r}")
        self.penalty = penalty

    def forward(self, flow: Tensor) -> Tensor:
        ndim = check_field(flow, "Grad")
        diffs = forward_differences(flow)
        terms = [(d * d).mean() if self.penalty == "l2" else d.abs().mean() for d in diffs]
        return sum(terms) / ndim

    def extra_repr(self) -> str:
        return f"penalty={self.penalty!r}"


@LOSSES.register
def grad(penalty: str = "l2") -> Grad:
    return Grad(penalty=penalty)
