"""Instance optimisation of a given field (e.g. a network's prediction), at the field level.

The network's weights are not touched: the displacement it predicted is the starting point of
the greedy diffeomorphic optimisation of :mod:`regkit.registration.deformable` (same losses,
regularisers and smoothing), usually at full resolution only and for few iterations. Each
update is composed with the current map, so a diffeomorphic prediction stays diffeomorphic
(up to interpolation of the composition); a folded prediction is not unfolded by construction
(add the ``folding`` regulariser for that).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from torch import Tensor

from regkit.errors import InputError
from regkit.registration.deformable import DeformableRegistration
from regkit.registration.result import DeformableResult


class Refine(DeformableRegistration):
    """Field-level refinement: :class:`DeformableRegistration` that must start from a field.

    Args:
        iterations: iterations per level (default 50 at full resolution only).
        levels: pyramid factors (default ``(1,)``: full resolution).
        step: longest update per iteration in voxels; smaller than the from-scratch preset's,
            since the start is already close.
        Other arguments as :class:`DeformableRegistration`.
    """

    def __init__(self, iterations: Any = 50, levels: Sequence[float] = (1,), loss: str = "lncc_fast",
                 loss_kwargs: Optional[Mapping[str, Any]] = None, regularizers: Optional[Mapping[str, Any]] = None,
                 step: Any = 0.25, grad_sigma: Any = 1.0, field_sigma: Any = 0.5, beta1: float = 0.9,
                 beta2: float = 0.99, tolerance: float = 0.0, patience: int = 10, inverse: bool = False,
                 antialias: float = 0.5, progress: bool = True, name: str = "refine") -> None:
        super().__init__(levels=levels, iterations=iterations, loss=loss, loss_kwargs=loss_kwargs,
                         regularizers=regularizers, step=step, grad_sigma=grad_sigma, field_sigma=field_sigma,
                         beta1=beta1, beta2=beta2, tolerance=tolerance, patience=patience, inverse=inverse,
                         antialias=antialias, progress=progress, name=name)

    def register(self, moving: Tensor, fixed: Tensor, init_flow: Optional[Tensor] = None) -> DeformableResult:
        """Refine ``init_flow`` ``(1, ndim, *spatial)`` (voxels, fixed grid) for ``moving`` -> ``fixed``."""
        if init_flow is None:
            raise InputError(f"{self.name}: refinement needs the field to start from (init_flow), got None")
        return super().register(moving, fixed, init_flow)
