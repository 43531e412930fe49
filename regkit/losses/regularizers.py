"""Regularisers on a displacement (or velocity) field ``(B, ndim, *spatial)`` in voxels.

``grad`` (diffusion) and ``bending`` (bending energy) act on ``output.field`` inside a
:class:`~regkit.losses.CompositeLoss`, the velocity of diffeomorphic models and the flow
otherwise; ``folding`` acts on the displacement ``output.flow``, whose Jacobian it penalises.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from regkit.errors import InputError
from regkit.losses.registry import LOSSES
from regkit.spatial import jacobian_determinant


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


@LOSSES.register(name="grad")
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


@LOSSES.register(name="bending")
class BendingEnergy(nn.Module):
    """Bending energy (thin-plate penalty) of a field ``u`` ``(B, ndim, *spatial)`` in voxels:

        BE = mean over b and x of  sum_c [ sum_i (d²u_c / dx_i²)² + 2 sum_(i<j) (d²u_c / dx_i dx_j)² ]

    i.e. the squared Frobenius norm of each component's Hessian (mixed terms counted twice, as
    in Rueckert et al. 1999), summed over components. Central differences, unit voxel spacing:
    ``d²u/dx_i² = u(x + e_i) - 2 u(x) + u(x - e_i)`` and
    ``d²u/dx_i dx_j = [u(x+e_i+e_j) - u(x+e_i-e_j) - u(x-e_i+e_j) + u(x-e_i-e_j)] / 4``, evaluated
    at the interior voxels (one voxel in from every face), which is exact for quadratic fields.
    Units: 1/voxel² (voxel displacement per voxel², squared). Every spatial axis needs >= 3 voxels.
    """

    inputs = "flow"

    def forward(self, flow: Tensor) -> Tensor:
        ndim = check_field(flow, "BendingEnergy")
        sizes = flow.shape[2:]
        if min(sizes) < 3:
            raise InputError(f"BendingEnergy: every spatial axis needs >= 3 voxels, got shape {tuple(flow.shape)}")

        def at(shift: dict) -> Tensor:
            """The field at (interior voxel + shift), ``shift`` = {axis: -1 or 1}."""
            return flow[(slice(None), slice(None)) +
                        tuple(slice(1 + shift.get(d, 0), s - 1 + shift.get(d, 0)) for d, s in enumerate(sizes))]

        centre = at({})
        total = flow.new_zeros(())
        for i in range(ndim):
            second = at({i: 1}) - 2 * centre + at({i: -1})
            total = total + second.pow(2).sum(1).mean()
            for j in range(i + 1, ndim):
                mixed = (at({i: 1, j: 1}) - at({i: 1, j: -1}) - at({i: -1, j: 1}) + at({i: -1, j: -1})) / 4
                total = total + 2 * mixed.pow(2).sum(1).mean()
        return total


@LOSSES.register(name="folding")
class Folding(nn.Module):
    """Folding penalty on the displacement ``u`` ``(B, ndim, *spatial)`` in voxels:

        L = mean over b and x of  max(0, margin - det J(x)),   J = I + du/dx

    with ``det J`` from :func:`regkit.spatial.jacobian_determinant` (central differences inside,
    one-sided at the faces, as the ``% |J| <= 0`` evaluation). With the default ``margin = 0``
    it is the mean magnitude of the negative determinants: zero for any field without folds
    (e.g. a translation), and differentiable wherever ``det J != margin``. Dimensionless.

    Inside a :class:`~regkit.losses.CompositeLoss` it receives the displacement ``output.flow``
    (``uses_displacement``), also for diffeomorphic models.
    """

    inputs = "flow"
    uses_displacement = True

    def __init__(self, margin: float = 0.0) -> None:
        super().__init__()
        if not -1.0 <= margin <= 1.0:
            raise InputError(f"Folding: margin must lie in [-1, 1], got {margin}")
        self.margin = float(margin)

    def forward(self, flow: Tensor) -> Tensor:
        check_field(flow, "Folding")
        if min(flow.shape[2:]) < 2:
            raise InputError(f"Folding: every spatial axis needs >= 2 voxels, got shape {tuple(flow.shape)}")
        return torch.relu(self.margin - jacobian_determinant(flow)).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin:g}"
