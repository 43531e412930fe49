"""Greedy diffeomorphic registration of two images on the same grid (no network).

The transformation is a displacement ``u`` in voxels on the fixed grid (regkit's convention:
``warped(x) = moving(x + u(x))``), built as the composition of many small smooth updates, the
greedy scheme of ANTs SyN and FireANTs:

1. ``L = similarity(moving ∘ (id + u), fixed) + Σ_k w_k · regulariser_k(u)``, and its gradient
   ``g = dL/du`` by autograd (the similarity is any loss of the registry, ``lncc_fast`` by
   default; the regularisers are registry terms such as ``grad`` or ``bending``);
2. Adam's normalised direction ``d = m̂ / (sqrt(v̂) + ε)`` of ``g`` (per voxel and component),
   Gaussian-smoothed (``grad_sigma`` voxels) and scaled so that its longest vector is
   ``step`` voxels of the level (only ever scaled down, as FireANTs does);
3. the update ``s = -d`` is composed with the current map, ``id + u ← (id + u) ∘ (id + s)``:
   ``u ← s + u(x + s(x))``;
4. the field is Gaussian-smoothed (``field_sigma`` voxels).

Each update moves points by at most ``step`` voxels (``< 1``), is smooth, and is scaled down when
the Lipschitz bound of its forward differences exceeds ``max_jacobian < 1``, so ``id + s`` is
invertible (a contraction perturbation of the identity); their composition is invertible too.
Steps 1-4 run on a coarse-to-fine pyramid (``levels``, e.g. ``(4, 2, 1)``): each level starts
from the previous level's field resampled by :func:`regkit.spatial.resize_flow` (and from a given
initial field at the first). Both image pyramids and the loss module are built once.

``inverse=True`` also returns the inverse field, ``x + w(x)`` with ``w(y) = -u(y + w(y))``,
solved by fixed-point iteration (the inverse of a small-Lipschitz displacement is its fixed
point).
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from regkit.errors import InputError
from regkit.losses.registry import create_loss
from regkit.registration.pyramid import image_pyramid, level_shape
from regkit.registration.result import DeformableResult, StageRecord
from regkit.registration.smoothing import gaussian_smooth
from regkit.spatial import compose_flows, resize_flow, warp


def check_pair(moving: Tensor, fixed: Tensor, what: str = "registration") -> int:
    """Validate two images ``(1, C, *spatial)`` on one grid (2-D or 3-D, finite); returns ndim."""
    for name, t in (("moving", moving), ("fixed", fixed)):
        if not isinstance(t, Tensor):
            raise InputError(f"{what}: {name} image must be a tensor, got {type(t).__name__}")
        if t.dim() not in (4, 5):
            raise InputError(f"{what}: {name} image must be (1, C, H, W) or (1, C, D, H, W), got shape "
                             f"{tuple(t.shape)}")
        if not t.is_floating_point():
            raise InputError(f"{what}: {name} image must be floating point, got {t.dtype}")
    if moving.dim() != fixed.dim():
        raise InputError(f"{what}: moving is {moving.dim() - 2}-D {tuple(moving.shape)} but fixed is "
                         f"{fixed.dim() - 2}-D {tuple(fixed.shape)}")
    if moving.shape != fixed.shape:
        raise InputError(f"{what}: moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must be on the same "
                         f"grid (resample the moving image onto the fixed grid first, e.g. with the affine stage)")
    if moving.shape[0] != 1:
        raise InputError(f"{what}: one pair at a time (batch 1), got batch {moving.shape[0]}")
    for name, t in (("moving", moving), ("fixed", fixed)):
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise InputError(f"{what}: {name} image has {bad} NaN/inf voxels")
    return moving.dim() - 2


def check_init_flow(flow: Optional[Tensor], fixed: Tensor, what: str) -> None:
    if flow is None:
        return
    ndim = fixed.dim() - 2
    expected = (1, ndim, *fixed.shape[2:])
    if not isinstance(flow, Tensor) or tuple(flow.shape) != expected:
        got = tuple(flow.shape) if isinstance(flow, Tensor) else type(flow).__name__
        raise InputError(f"{what}: initial flow must be {expected} (voxels on the fixed grid), got {got}")
    if not torch.isfinite(flow).all():
        raise InputError(f"{what}: initial flow has {int((~torch.isfinite(flow)).sum())} NaN/inf values")


def build_terms(loss: str, loss_kwargs: Optional[Mapping[str, Any]], regularizers: Optional[Mapping[str, Any]]):
    """The similarity term and ``[(name, weight, module)]`` regularisers from registry names.

    ``regularizers`` maps a registry name to a weight or to ``{"weight": w, **kwargs}``."""
    sim = create_loss(loss, **dict(loss_kwargs or {}))
    if getattr(sim, "inputs", None) != "images":
        raise InputError(f"loss '{loss}' is not an image similarity (it takes {getattr(sim, 'inputs', '?')!r}); "
                         f"give regularisers under 'regularizers'")
    regs = []
    for name, spec in dict(regularizers or {}).items():
        kwargs = dict(spec) if isinstance(spec, Mapping) else {"weight": spec}
        weight = float(kwargs.pop("weight", 1.0))
        term = create_loss(name, **kwargs)
        if getattr(term, "inputs", None) != "flow":
            raise InputError(f"regulariser '{name}' is not a field term (it takes {getattr(term, 'inputs', '?')!r})")
        if weight < 0 or not math.isfinite(weight):
            raise InputError(f"regulariser '{name}': weight must be a finite number >= 0, got {weight}")
        if weight > 0:
            regs.append((name, weight, term))
    return sim, regs


def invert_flow(flow: Tensor, iterations: int = 30) -> Tensor:
    """Inverse of ``x + flow(x)`` as a displacement ``w`` (voxels): the fixed point of
    ``w(y) = -flow(y + w(y))``, iterated ``iterations`` times from ``-flow``. Converges when
    the displacement's Lipschitz constant is below 1 (smooth diffeomorphic fields)."""
    with torch.no_grad():
        w = -flow
        for _ in range(iterations):
            w = -warp(flow, w, padding_mode="border")
    return w


def per_level(value, n: int, what: str) -> List:
    """A scalar repeated, or a sequence of exactly ``n`` values (one per pyramid level)."""
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not isinstance(value, str):
        values = list(value)
        if len(values) != n:
            raise InputError(f"{what}: need one value per pyramid level ({n}), got {values}")
        return values
    return [value] * n


def lipschitz_bound(s: Tensor) -> Tensor:
    """An upper bound of the Lipschitz constant (voxel units) of the sampled displacement ``s``
    ``(1, ndim, *spatial)``: ``sqrt(sum_j max_x sum_k (s_k(x + e_j) - s_k(x))²)``, which is at least
    the largest Frobenius norm, so the largest operator norm, of its forward-difference Jacobian."""
    total = s.new_zeros(())
    for j in range(s.dim() - 2):
        n = s.shape[2 + j]
        if n < 2:
            continue
        diff = s.narrow(2 + j, 1, n - 1) - s.narrow(2 + j, 0, n - 1)
        total = total + diff.square().sum(1).amax()
    return total.sqrt()


class GreedyOptimizer:
    """Adam moments of the field's gradient and the compositive update (module docstring,
    steps 2-4). State lives on the field's device and dtype."""

    def __init__(self, shape, like: Tensor, step: float, grad_sigma: float, field_sigma: float,
                 beta1: float, beta2: float, eps: float = 1e-8, truncate: float = 2.0,
                 max_jacobian: float = 0.9) -> None:
        self.m = like.new_zeros(shape)
        self.v = like.new_zeros(shape)
        self.t = 0
        self.max_jacobian = max_jacobian
        self.capped = like.new_zeros((), dtype=torch.int64)  # iterations where the cap acted (no sync)
        self.step, self.grad_sigma, self.field_sigma = step, grad_sigma, field_sigma
        self.beta1, self.beta2, self.eps, self.truncate = beta1, beta2, eps, truncate

    @torch.no_grad()
    def update(self, u: Tensor, grad: Tensor) -> Tensor:
        """The new field ``(1, ndim, *s)`` after one greedy step along ``-grad``."""
        self.t += 1
        self.m.mul_(self.beta1).add_(grad, alpha=1 - self.beta1)
        self.v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        c1 = 1 - self.beta1 ** self.t
        c2 = 1 - self.beta2 ** self.t
        d = (self.v / c2).sqrt_().add_(self.eps)
        d = torch.div(self.m, d).div_(c1)
        if self.grad_sigma > 0:
            d = gaussian_smooth(d, self.grad_sigma, truncate=self.truncate)
        # The longest update vector is `step` voxels (scaled down only, never up).
        longest = d.square().sum(1).amax().sqrt()
        scale = -self.step / torch.clamp(longest, min=1.0)
        s = d.mul_(scale)
        if self.max_jacobian > 0:
            # id + s is invertible when s is a contraction (Lipschitz < 1). The bound
            # sqrt(sum_j max_x |d s / d x_j|^2) (forward differences) exceeds the largest
            # Frobenius norm of its Jacobian, hence its operator norm: cap it (no host sync).
            bound = lipschitz_bound(s)
            self.capped += (bound > self.max_jacobian).long()
            s.mul_(torch.clamp(self.max_jacobian / bound.clamp_min(1e-12), max=1.0))
        new = s + warp(u, s, padding_mode="border")
        if self.field_sigma > 0:
            new = gaussian_smooth(new, self.field_sigma, truncate=self.truncate)
        return new


class DeformableRegistration:
    """Greedy diffeomorphic registration on a pyramid (see the module docstring).

    Args:
        levels: pyramid factors, coarse to fine, e.g. ``(4, 2, 1)``; ``1`` is full resolution.
            A last factor above 1 optimises coarse only and upsamples the field.
        iterations: iterations per level (one number or one per level).
        loss: registry name of the image similarity (``lncc_fast``, ``lncc``, ``ncc``, ``mse``,
            ``mi``...); ``loss_kwargs`` its options (e.g. ``{"window": 7}``).
        regularizers: ``{registry name: weight}`` of field terms added to the loss (``grad``,
            ``bending``, ``folding``), applied to the displacement of the level.
        step: longest update per iteration, voxels of the level (one number or one per level).
        grad_sigma, field_sigma: Gaussian sigmas (voxels of the level) of the update and of the
            field after each composition (one number or one per level).
        beta1, beta2: Adam's moment decays.
        tolerance, patience: stop a level when the loss improved by less than
            ``tolerance · |loss|`` over the last ``patience`` iterations (0 disables).
        inverse: also compute the inverse field (``DeformableResult.inverse_flow``) by
            ``inverse_iterations`` fixed-point iterations (:func:`invert_flow`).
        max_jacobian: cap of the Lipschitz bound of each update (:func:`lipschitz_bound`), below
            1 so that every update is invertible; 0 disables it. Iterations where it acted are
            counted in the records (``capped_iterations``).
        symmetric: optimise two half-way maps instead of one, ``moving ∘ ψ_m`` against
            ``fixed ∘ ψ_f`` (SyN's symmetric form, each map greedy as above); the result is
            ``φ = ψ_m ∘ ψ_f⁻¹`` and, with ``inverse``, ``φ⁻¹ = ψ_f ∘ ψ_m⁻¹`` (about 1.7× the
            cost per iteration, plus the inversions).
        antialias: image pyramid's Gaussian, ``sigma = antialias · (factor - 1)`` voxels.
        progress: show a tqdm bar.
        name: the stage name in the records (``"deformable"``, ``"refine"``).
    """

    def __init__(self, levels: Sequence[float] = (4, 2, 1), iterations: Any = (200, 100, 50),
                 loss: str = "lncc_fast", loss_kwargs: Optional[Mapping[str, Any]] = None,
                 regularizers: Optional[Mapping[str, Any]] = None, step: Any = 0.25,
                 grad_sigma: Any = 1.0, field_sigma: Any = 0.5, beta1: float = 0.9, beta2: float = 0.99,
                 tolerance: float = 0.0, patience: int = 10, inverse: bool = False, inverse_iterations: int = 20,
                 symmetric: bool = False, max_jacobian: float = 0.9, antialias: float = 0.5,
                 progress: bool = True, name: str = "deformable") -> None:
        self.levels = [float(f) for f in levels]
        if not self.levels:
            raise InputError(f"{name}: at least one pyramid level is needed")
        for f in self.levels:
            if not f >= 1:
                raise InputError(f"{name}: pyramid factors must be >= 1, got {list(levels)}")
        n = len(self.levels)
        self.iterations = [int(i) for i in per_level(iterations, n, f"{name}.iterations")]
        if any(i < 0 for i in self.iterations):
            raise InputError(f"{name}: iterations must be >= 0, got {self.iterations}")
        self.step = [float(s) for s in per_level(step, n, f"{name}.step")]
        if any(not 0 < s < 1 for s in self.step):
            raise InputError(f"{name}: step must lie in (0, 1) voxel so that each update is invertible, "
                             f"got {self.step}")
        self.grad_sigma = [float(s) for s in per_level(grad_sigma, n, f"{name}.grad_sigma")]
        self.field_sigma = [float(s) for s in per_level(field_sigma, n, f"{name}.field_sigma")]
        self.loss_name, self.loss_kwargs = loss, dict(loss_kwargs or {})
        self.regularizer_spec = dict(regularizers or {})
        # Build once now so that an unknown name fails at construction, not mid-run.
        self.similarity, self.regularizers = build_terms(loss, self.loss_kwargs, self.regularizer_spec)
        if not 0 <= beta1 < 1 or not 0 <= beta2 < 1:
            raise InputError(f"{name}: Adam betas must lie in [0, 1), got {beta1}, {beta2}")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.tolerance, self.patience = float(tolerance), int(patience)
        self.inverse, self.inverse_iterations = bool(inverse), int(inverse_iterations)
        self.symmetric = bool(symmetric)
        if not 0 <= max_jacobian < 1:
            raise InputError(f"{name}: max_jacobian must lie in [0, 1) (0 disables the cap), got {max_jacobian}")
        self.max_jacobian = float(max_jacobian)
        self.antialias = float(antialias)
        self.progress = progress
        self.name = name

    # -- the loss of one level ------------------------------------------------------------------
    def _loss(self, moving: Tensor, fixed: Tensor, u: Tensor, u_fixed: Optional[Tensor] = None) -> Tensor:
        """Similarity of the warped pair plus the weighted regularisers of every field."""
        target = fixed if u_fixed is None else warp(fixed, u_fixed)
        total = self.similarity(warp(moving, u), target)
        for _, weight, term in self.regularizers:
            for field in (u,) if u_fixed is None else (u, u_fixed):
                total = total + weight * term(field)
        return total

    def __call__(self, moving: Tensor, fixed: Tensor, init_flow: Optional[Tensor] = None) -> DeformableResult:
        return self.register(moving, fixed, init_flow)

    def register(self, moving: Tensor, fixed: Tensor, init_flow: Optional[Tensor] = None) -> DeformableResult:
        """Register ``moving`` to ``fixed`` (both ``(1, C, *spatial)`` on the fixed grid).

        Args:
            init_flow: optional starting displacement ``(1, ndim, *spatial)`` in voxels (e.g. a
                network's prediction); the identity when ``None``.
        Returns:
            :class:`DeformableResult` with ``flow`` ``(1, ndim, *spatial)`` in voxels (float32),
            ``inverse_flow`` when ``inverse=True``, one :class:`StageRecord` per level.
        """
        check_pair(moving, fixed, self.name)
        check_init_flow(init_flow, fixed, self.name)
        dtype = torch.float64 if fixed.dtype == torch.float64 else torch.float32
        moving, fixed = moving.to(dtype), fixed.to(dtype)
        full = list(fixed.shape[2:])
        shapes = [level_shape(full, f) for f in self.levels]
        fixed_pyr = image_pyramid(fixed, shapes, self.antialias)
        moving_pyr = image_pyramid(moving, shapes, self.antialias)
        similarity = self.similarity.to(fixed.device)
        self.similarity = similarity
        ndim = len(full)

        # One field (moving -> fixed), or two half-way fields in symmetric mode (index 0 warps
        # the moving image, index 1 the fixed image).
        fields: List[Optional[Tensor]] = [None, None] if self.symmetric else [None]
        records: List[StageRecord] = []
        bar = tqdm(total=sum(self.iterations), desc=self.name, disable=not self.progress, leave=False)
        try:
            for li, (factor, shape) in enumerate(zip(self.levels, shapes)):
                start = time.perf_counter()
                for k, u in enumerate(fields):
                    if u is None:
                        u = (resize_flow(init_flow.to(dtype), shape) if init_flow is not None and k == 0
                             else fixed.new_zeros(1, ndim, *shape))
                    else:
                        u = resize_flow(u, shape)
                    fields[k] = u.detach().contiguous()
                opts = [GreedyOptimizer(u.shape, u, self.step[li], self.grad_sigma[li], self.field_sigma[li],
                                        self.beta1, self.beta2, max_jacobian=self.max_jacobian) for u in fields]
                m_l, f_l = moving_pyr[li], fixed_pyr[li]
                losses: List[Tensor] = []
                done = 0
                for it in range(self.iterations[li]):
                    for u in fields:
                        u.requires_grad_(True)
                    loss = self._loss(m_l, f_l, *fields)
                    grads = torch.autograd.grad(loss, fields)
                    fields = [opt.update(u.detach(), g) for opt, u, g in zip(opts, fields, grads)]
                    losses.append(loss.detach())
                    done += 1
                    bar.update(1)
                    if self._converged(losses):
                        break
                    if it % 20 == 0:
                        bar.set_postfix(level=int(factor) if factor.is_integer() else factor,
                                        loss=f"{float(losses[-1]):.4f}")
                bar.update(self.iterations[li] - done)
                values = torch.stack(losses).tolist() if losses else []
                records.append(StageRecord(
                    name=self.name, level=int(factor) if factor.is_integer() else factor, shape=list(shape),
                    iterations=done, losses=values, seconds=time.perf_counter() - start,
                    extra={"step": self.step[li], "grad_sigma": self.grad_sigma[li],
                           "field_sigma": self.field_sigma[li], "loss": self.loss_name,
                           "symmetric": self.symmetric,
                           "capped_iterations": sum(int(o.capped) for o in opts)}))
        finally:
            bar.close()

        fields = [resize_flow(u.detach(), full).float() for u in fields]
        inverse = None
        start = time.perf_counter()
        if self.symmetric:
            # phi = psi_m o psi_f^-1 and phi^-1 = psi_f o psi_m^-1, from the two half-way maps.
            u_m, u_f = fields
            w_f = invert_flow(u_f, self.inverse_iterations)
            flow = compose_flows(u_m, w_f)
            if self.inverse:
                inverse = compose_flows(u_f, invert_flow(u_m, self.inverse_iterations))
            records.append(StageRecord(name=f"{self.name}-compose", level=1, shape=full,
                                       iterations=self.inverse_iterations * (2 if self.inverse else 1),
                                       seconds=time.perf_counter() - start))
        else:
            flow = fields[0]
            if self.inverse:
                inverse = invert_flow(flow, self.inverse_iterations)
                records.append(StageRecord(name=f"{self.name}-inverse", level=1, shape=full,
                                           iterations=self.inverse_iterations, seconds=time.perf_counter() - start))
        return DeformableResult(flow=flow, inverse_flow=inverse, stages=records)

    def _converged(self, losses: List[Tensor]) -> bool:
        if self.tolerance <= 0 or len(losses) <= self.patience or len(losses) % 5:
            return False
        old, new = float(losses[-1 - self.patience]), float(losses[-1])
        return old - new < self.tolerance * abs(old)

    def spec(self) -> Dict[str, Any]:
        """Plain-data settings (for register.json)."""
        return {"levels": self.levels, "iterations": self.iterations, "loss": self.loss_name,
                "loss_kwargs": self.loss_kwargs, "regularizers": self.regularizer_spec, "step": self.step,
                "grad_sigma": self.grad_sigma, "field_sigma": self.field_sigma, "beta1": self.beta1,
                "beta2": self.beta2, "tolerance": self.tolerance, "patience": self.patience,
                "inverse": self.inverse, "symmetric": self.symmetric, "max_jacobian": self.max_jacobian,
                "antialias": self.antialias}
