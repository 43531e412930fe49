"""Typed results of the optimisation engine (one type per stage kind, never a tuple).

Conventions:
* ``matrix`` (affine stages) is a 4×4 (3×3 for 2-D images) float64 world transform, mm, that maps a point of the
  FIXED image's world to the point of the MOVING image's world it is compared with:
  ``p_moving = matrix @ p_fixed`` (homogeneous). Sampling the moving scan through its own header
  at ``inv(A_moving) @ matrix @ A_fixed @ x`` for each fixed voxel ``x`` gives the affinely
  aligned image on the fixed grid. The identity matrix means "compare the scans where their
  headers put them".
* ``flow`` (deformable stages) is a displacement in voxels of the FIXED grid, ``(1, ndim, *fixed)``,
  channel k along axis k (regkit.spatial): ``warped(x) = moving_on_fixed_grid(x + flow(x))``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
from torch import Tensor


@dataclass
class StageRecord:
    """What one stage (one pyramid level of one transform) did, for ``register.json`` and the
    loss-curve picture. ``losses`` holds the total loss after each iteration (lower is better)."""

    name: str                      # e.g. "affine", "deformable", "refine"
    level: int                     # pyramid factor of this level (4 = quarter resolution), 1 = full
    shape: List[int]               # grid size optimised at this level
    iterations: int
    losses: List[float] = field(default_factory=list)
    seconds: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "level": self.level, "shape": list(self.shape), "iterations": self.iterations,
                "loss_first": self.losses[0] if self.losses else None,
                "loss_final": self.losses[-1] if self.losses else None, "seconds": self.seconds, **self.extra}


@dataclass
class AffineResult:
    """An affine stage's output: the world matrix (see the module docstring) and its records."""

    matrix: np.ndarray             # (4, 4) float64 ((3, 3) in 2-D), fixed world -> moving world, mm
    stages: List[StageRecord] = field(default_factory=list)


@dataclass
class DeformableResult:
    """A deformable (or refinement) stage's output on the fixed grid.

    ``flow``: ``(1, ndim, *fixed)`` voxels; ``inverse_flow``: the same for the inverse
    transformation (``x + inverse_flow(x)`` maps moving-on-fixed-grid positions back), when the
    method gives one, else ``None``; ``velocity``: the stationary velocity for SVF methods.
    """

    flow: Tensor
    inverse_flow: Optional[Tensor] = None
    velocity: Optional[Tensor] = None
    stages: List[StageRecord] = field(default_factory=list)


@dataclass
class RegistrationResult:
    """A whole registration (a :class:`~regkit.registration.pipeline.Pipeline`'s output).

    ``flow``: ``(1, ndim, *fixed)`` the WHOLE transformation, affine included, in fixed voxels:
    sampling the moving scan through its own header at the world point ``A_fixed @ (x + flow(x))``
    for each fixed voxel ``x`` gives ``warped``. With the affine stage's ``matrix`` ``T`` and the
    deformable displacement ``d`` (computed on the affinely resampled moving image):
    ``x + flow(x) = inv(A_fixed) @ T @ A_fixed @ (x + d(x))``.
    ``warped``: ``(1, C, *fixed)`` the moving image resampled once through ``flow``.
    ``affine``: the affine stage's result (``None`` without one); ``deformable``: the deformable
    (or refinement) stage's result on the fixed grid, whose ``inverse_flow`` (when present)
    inverts ``d`` alone; ``stages``: every stage's records in order; ``seconds``: wall time per
    stage kind (``{"affine": s, "deformable": s, ...}``).
    """

    flow: Tensor
    warped: Tensor
    affine: Optional[AffineResult] = None
    deformable: Optional[DeformableResult] = None
    stages: List[StageRecord] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)
