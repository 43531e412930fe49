"""Affine registration by optimisation, in world coordinates (mm): rigid, similarity, full affine.

The two scans may lie on different grids, with different voxel sizes and orientations: every
comparison goes through both voxel-to-world affines, and the result is a world matrix ``T``
(fixed world -> moving world, ``p_moving = T @ p_fixed``; see :mod:`regkit.registration.result`).

Model. ``T(p) = L (p - c) + c + t0 + r tau`` with

* ``c`` the fixed image's centre of mass (mm), so rotations and scalings act about the anatomy
  rather than the world origin, and ``t0 = c_moving - c`` (the centre-of-mass initialisation);
* ``L = L0 @ expm(M)``: ``L0`` the initial linear part (identity, or the principal-axes rotation of
  ``init="moments"``) and ``M`` the optimised ``ndim × ndim`` matrix: skew-symmetric for
  ``rigid`` (3 angles in 3-D, 1 in 2-D; ``expm`` of a skew matrix is a rotation, exactly),
  skew plus ``s I`` for ``similarity`` (``e^s`` is the scale), any matrix for ``affine``
  (rotation, log-scales and shears together; 9 numbers in 3-D, 4 in 2-D);
* ``tau`` the translation in units of ``r``, the fixed foreground's radius of gyration (mm). Every
  parameter is then dimensionless and a unit step moves the anatomy by about ``r`` mm, whether it
  is a rotation, a scaling, a shear or a shift, so one learning rate suits them all.

Degrees of freedom: rigid 6 (3-D) / 3 (2-D), similarity 7 / 4, affine 12 / 6.

Pyramid. Level ``f`` compares the images at about ``f`` times the fixed image's finest voxel size:
each scan is block-averaged in its own voxel grid (integer factors per axis, so the level's
affine is exact: ``A @ diag(k) + (k - 1) / 2``). The moving level image is sampled, through ``T``
and the affines, at the fixed level's voxel centres by ``grid_sample`` (linear, zeros outside).
For the global losses (``ncc``, ``mse``, ``mi``: functions of the set of intensity pairs, not of
their arrangement) a level with more than ``samples`` voxels is evaluated on a fixed random subset
of that many of them (drawn once per level from ``seed``), which keeps the objective deterministic
and full-resolution levels cheap; local losses (``lncc*``) use the whole level grid.

Intensities are normalised to [0, 1] first (``normalize``, default ``percentile``: clipped to the
0.5-99.5 percentiles), which the ``mi`` loss requires. Voxels above ``foreground`` (of that range)
are the foreground: they weigh the centre of mass and the second moments, and the overlap check
counts them.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from regkit.data.io import PathLike, Volume, load_volume
from regkit.data.pairs import normalize_intensity
from regkit.device import resolve_device, synchronize
from regkit.errors import InputError, check_choice
from regkit.losses.registry import create_loss
from regkit.registration.result import AffineResult, StageRecord
from regkit.registration.world import world_affine

log = logging.getLogger("regkit")

TRANSFORMS = ("rigid", "similarity", "affine")
INITS = ("none", "com", "moments")
OPTIMIZERS = ("adam", "lbfgs")
NORMALIZE = ("percentile", "minmax", "none")
#: losses that depend only on the set of (moving, fixed) intensity pairs, so that a random subset
#: of voxels estimates them; any other image loss is evaluated on the whole level grid.
SAMPLED_LOSSES = ("ncc", "mse", "mi")


@dataclass
class _Image:
    """One normalised scan: ``data`` (1, 1, *shape) on the device, ``affine`` (n+1)² float64."""

    data: Tensor
    affine: np.ndarray
    name: str

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.data.shape[2:])

    @property
    def spacing(self) -> np.ndarray:
        n = self.data.dim() - 2
        return np.sqrt((self.affine[:n, :n] ** 2).sum(axis=0))


@dataclass
class _Level:
    """What one pyramid level optimises: the fixed points, their values, the moving level image."""

    factor: int
    shape: Tuple[int, ...]            # the fixed level grid
    points: Tensor                    # (N, n) float32: fixed world points minus the centre c, mm
    fixed: Tensor                     # (1, 1, *out) fixed intensities at those points
    out_shape: Tuple[int, ...]        # grid_sample's output shape: the grid, or (N, 1[, 1]) when sampled
    foreground: Tensor                # (N,) bool: fixed intensity above the foreground threshold
    moving: Tensor                    # (1, 1, *moving level shape)
    to_grid: Tensor                   # (n+1, n+1) float64: moving world -> grid_sample's [-1, 1] coords


def _block_average(img: _Image, factors: Sequence[int]) -> _Image:
    """Average ``k`` voxels per axis (the trailing remainder is dropped); the level's affine maps
    its voxel ``i`` to the centre of the block it averages, old voxel ``k i + (k - 1) / 2``."""
    k = tuple(int(v) for v in factors)
    n = len(k)
    if all(v == 1 for v in k):
        return img
    pool = F.avg_pool3d if n == 3 else F.avg_pool2d
    data = pool(img.data, kernel_size=k, stride=k)
    s = np.eye(n + 1)
    s[:n, :n] = np.diag(k)
    s[:n, n] = (np.asarray(k) - 1) / 2.0
    return _Image(data, img.affine @ s, img.name)


def _level_factors(spacing: np.ndarray, shape: Sequence[int], factor: int, base: float) -> List[int]:
    """Per-axis block sizes giving voxels of about ``factor * base`` mm, keeping >= 8 voxels per axis."""
    return [max(1, min(int(round(factor * base / s)), n // 8)) for s, n in zip(spacing, shape)]


def _grid_normaliser(shape: Sequence[int], dtype=torch.float64, device=None) -> Tensor:
    """Voxel index -> grid_sample's align_corners=True coordinate in [-1, 1], as a homogeneous matrix."""
    n = len(shape)
    m = torch.eye(n + 1, dtype=dtype, device=device)
    for i, s in enumerate(shape):
        m[i, i] = 2.0 / max(s - 1, 1)
        m[i, n] = -1.0
    return m


def _skew(w: Tensor, n: int) -> Tensor:
    z = torch.zeros((), dtype=w.dtype, device=w.device)
    if n == 2:
        return torch.stack([torch.stack([z, -w[0]]), torch.stack([w[0], z])])
    return torch.stack([torch.stack([z, -w[2], w[1]]), torch.stack([w[2], z, -w[0]]),
                        torch.stack([-w[1], w[0], z])])


def _moments(img: _Image, threshold: float) -> Tuple[np.ndarray, np.ndarray, float]:
    """Centre of mass (mm), second central moments (mm²) and total weight of the foreground,
    weighted by intensity, in world coordinates."""
    n = img.data.dim() - 2
    w = img.data[0, 0].double()
    w = torch.where(w > threshold, w, torch.zeros_like(w)).reshape(-1)
    total = float(w.sum())
    if total <= 0:
        raise InputError(f"{img.name}: no voxel above the foreground threshold {threshold} (after normalisation to "
                         f"[0, 1]); the scan looks empty")
    idx = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64, device=w.device) for s in img.shape],
                                     indexing="ij")).reshape(n, -1)
    a = torch.from_numpy(img.affine).to(w.device)
    p = a[:n, :n] @ idx + a[:n, n:]
    c = (p * w).sum(1) / total
    d = p - c[:, None]
    cov = (d * w) @ d.T / total
    return c.cpu().numpy(), cov.cpu().numpy(), total


class _AffineModel:
    """``T(p) = L0 expm(M) (p - c) + c + t0 + r tau`` for one registration (the module docstring)."""

    def __init__(self, transform: str, n: int, centre: np.ndarray, t0: np.ndarray, radius: float,
                 device: torch.device) -> None:
        self.transform, self.n, self.radius = transform, n, float(radius)
        self.centre = torch.as_tensor(centre, dtype=torch.float64, device=device)
        self.t0 = torch.as_tensor(t0, dtype=torch.float64, device=device)
        self.l0 = torch.eye(n, dtype=torch.float64, device=device)
        rot = 3 if n == 3 else 1
        self.n_params = {"rigid": rot + n, "similarity": rot + 1 + n, "affine": n * n + n}[transform]

    def matrix(self, p: Tensor) -> Tensor:
        """The world matrix ``T`` ``(n+1, n+1)`` float64 of the parameters ``p`` (differentiable)."""
        n = self.n
        if self.transform == "affine":
            m, k = p[: n * n].reshape(n, n), n * n
        else:
            rot = 3 if n == 3 else 1
            m, k = _skew(p[:rot], n), rot
            if self.transform == "similarity":
                m, k = m + p[k] * torch.eye(n, dtype=p.dtype, device=p.device), k + 1
        lin = self.l0 @ torch.linalg.matrix_exp(m)
        shift = self.centre + self.t0 + self.radius * p[k: k + n] - lin @ self.centre
        top = torch.cat([lin, shift[:, None]], 1)
        bottom = torch.zeros(1, n + 1, dtype=p.dtype, device=p.device)
        bottom[0, n] = 1.0
        return torch.cat([top, bottom], 0)


class AffineRegistration:
    """Affine (rigid / similarity / full) registration of a moving scan to a fixed one in world space.

    Args:
        transform: ``rigid``, ``similarity`` or ``affine`` (see the module docstring).
        loss: an image loss of the registry by name (``ncc`` or ``lncc_fast`` for the same
            contrast, ``mi`` for different contrasts; ``mse``, ``lncc``, ``lncc_group``).
        loss_kwargs: arguments of that loss (e.g. ``{"num_bins": 32}`` for ``mi``).
        init: ``none`` (the headers as they are), ``com`` (translate the moving centre of mass
            onto the fixed one) or ``moments`` (also rotate the principal axes of the second
            moments onto each other, trying each sign flip of the axes, and keeping among those
            and the ``com`` start the one of lowest loss on the coarsest level; for similarity
            and affine the scale of the moments too).
        levels: pyramid factors, coarse to fine (e.g. ``[4, 2, 1]``: about 4, 2 and 1 times the
            fixed image's finest voxel size).
        iterations: optimiser iterations per level (same length as ``levels``).
        lr: (``adam`` only) the step size on the coarsest level, in the dimensionless units of the parameters
            (about ``lr * r`` mm per step); a finer level ``f`` starts at ``lr * f / levels[0]``
            (it starts near its optimum), and within each level it decays by a cosine to
            ``lr_floor`` times that.
        lr_floor: (``adam`` only) final fraction of ``lr`` at the end of each level.
        optimizer: ``lbfgs`` (L-BFGS with a strong-Wolfe line search; ``iterations`` then count
            loss evaluations) or ``adam`` (which uses ``lr`` and ``lr_floor``).
        samples: voxels a global loss (``ncc``, ``mse``, ``mi``) is evaluated on per level at most
            (a fixed random subset of the level grid); 0 = all.
        normalize: intensity normalisation to [0, 1] before anything else: ``percentile``,
            ``minmax`` or ``none`` (the images must already lie in [0, 1] for ``mi``).
        foreground: intensity threshold (of the normalised [0, 1] range) of the foreground.
        min_overlap: the smallest fraction of the fixed foreground that must map inside the
            moving scan's field of view, after the initialisation and at the end; below it the
            scans do not overlap in world space and registration stops with an error.
        seed: seed of the voxel subsets.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a ``torch.device``.
        progress: show a tqdm bar.
    """

    def __init__(self, transform: str = "affine", loss: str = "ncc", loss_kwargs: Optional[Dict[str, Any]] = None,
                 init: str = "com", levels: Sequence[int] = (4, 2, 1), iterations: Sequence[int] = (60, 30, 15),
                 lr: float = 0.01, lr_floor: float = 0.02, optimizer: str = "lbfgs", samples: int = 2 ** 16,
                 normalize: str = "percentile", foreground: float = 0.05, min_overlap: float = 0.25,
                 seed: int = 0, device: Any = "auto", progress: bool = True) -> None:
        self.transform = check_choice("affine transform", transform, TRANSFORMS)
        self.init = check_choice("affine init", init, INITS)
        self.optimizer = check_choice("affine optimizer", optimizer, OPTIMIZERS)
        self.normalize = check_choice("affine normalize", normalize, NORMALIZE)
        self.levels = [int(v) for v in levels]
        self.iterations = [int(v) for v in iterations]
        if not self.levels or any(v < 1 for v in self.levels):
            raise InputError(f"affine levels must be integers >= 1, got {list(levels)}")
        if len(self.iterations) != len(self.levels) or any(v < 0 for v in self.iterations):
            raise InputError(f"affine iterations must be {len(self.levels)} integers >= 0 (one per level "
                             f"{self.levels}), got {list(iterations)}")
        if not lr > 0 or not 0 < lr_floor <= 1:
            raise InputError(f"affine lr must be > 0 and lr_floor in (0, 1], got {lr}, {lr_floor}")
        if samples < 0:
            raise InputError(f"affine samples must be >= 0, got {samples}")
        if not 0 <= foreground < 1 or not 0 <= min_overlap <= 1:
            raise InputError(f"affine foreground must be in [0, 1) and min_overlap in [0, 1], got {foreground}, "
                             f"{min_overlap}")
        self.loss_name = loss
        self.loss_kwargs = dict(loss_kwargs or {})
        self.loss_fn = create_loss(loss, **self.loss_kwargs)   # unknown names fail here, with the valid ones
        if getattr(self.loss_fn, "inputs", None) != "images":
            raise InputError(f"affine loss '{loss}' is not an image similarity (it takes "
                             f"'{getattr(self.loss_fn, 'inputs', '?')}'); use e.g. ncc, mi, lncc_fast or mse")
        self.lr, self.lr_floor = float(lr), float(lr_floor)
        self.samples = int(samples)
        self.foreground = float(foreground)
        self.min_overlap = float(min_overlap)
        self.seed = int(seed)
        self.device = device
        self.progress = bool(progress)

    # -- public entry points ------------------------------------------------------------------
    def register_files(self, moving: PathLike, fixed: PathLike) -> AffineResult:
        """Register two image files (``.nii``, ``.nii.gz``, ``.mgz``; 2-D or 3-D, the same for both)."""
        return self.register_volumes(load_volume(moving, ndim=None), load_volume(fixed, ndim=None))

    def register_volumes(self, moving: Volume, fixed: Volume) -> AffineResult:
        """Register two loaded :class:`~regkit.data.io.Volume` s (their 4×4 file affines)."""
        return self(moving.data, fixed.data, moving.affine, fixed.affine,
                    moving_name=str(moving.path or "moving"), fixed_name=str(fixed.path or "fixed"))

    def __call__(self, moving, fixed, moving_affine, fixed_affine, moving_name: str = "moving",
                 fixed_name: str = "fixed") -> AffineResult:
        """Register ``moving`` to ``fixed``.

        Args:
            moving, fixed: arrays or tensors ``(*spatial)`` or ``(1, 1, *spatial)``, 2-D or 3-D
                (both the same), any sizes.
            moving_affine, fixed_affine: voxel-to-world affines, ``(ndim + 1)²`` (a 2-D image may
                give its NIfTI 4×4, see :func:`~regkit.registration.world.world_affine`).
            moving_name, fixed_name: how errors name the scans (e.g. their paths).
        Returns:
            :class:`AffineResult`: the world matrix (fixed world -> moving world) and one
            :class:`StageRecord` per pyramid level.
        """
        device = resolve_device(self.device)
        mov = self._image(moving, moving_affine, moving_name, device)
        fix = self._image(fixed, fixed_affine, fixed_name, device)
        if mov.data.dim() != fix.data.dim():
            raise InputError(f"{moving_name} is {mov.data.dim() - 2}-D but {fixed_name} is {fix.data.dim() - 2}-D; "
                             f"register scans of the same dimension")
        n = fix.data.dim() - 2
        # centres of mass and second moments on the coarsest level (block averages keep the mass)
        c_f, cov_f, _ = _moments(self._pooled_fixed(fix, self.levels[0]), self.foreground)
        c_m, cov_m, _ = _moments(self._pooled_moving(mov, fix, self.levels[0]), self.foreground)
        radius = float(np.sqrt(max(np.trace(cov_f), 1e-12)))
        levels = self._pyramid(mov, fix, c_f)
        model = _AffineModel(self.transform, n, c_f, (c_m - c_f) if self.init != "none" else np.zeros(n), radius,
                             device)
        params = torch.zeros(model.n_params, dtype=torch.float64, device=device, requires_grad=True)

        candidates = self._initial_linear(cov_f, cov_m, n)
        init_losses = []
        with torch.no_grad():
            for l0 in candidates:
                model.l0 = torch.as_tensor(l0, dtype=torch.float64, device=device)
                init_losses.append(float(self._loss(levels[0], model, params)))
            best = int(np.argmin(init_losses))
            model.l0 = torch.as_tensor(candidates[best], dtype=torch.float64, device=device)
            overlap = self._overlap(levels[0], model, params)
        if overlap < self.min_overlap:
            raise InputError(f"{moving_name} and {fixed_name} do not overlap in world space after the '{self.init}' "
                             f"initialisation ({100 * overlap:.1f}% of the fixed foreground maps inside the moving "
                             f"scan, < {100 * self.min_overlap:.0f}%); check the headers"
                             + (", or use init=com" if self.init == "none" else ""))

        stages: List[StageRecord] = []
        bar = tqdm(total=sum(self.iterations), desc=f"affine ({self.transform})", disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        try:
            for lv, iters in zip(levels, self.iterations):
                synchronize(device)
                t_start = time.perf_counter()
                lr = self.lr * lv.factor / self.levels[0]
                losses = self._optimise(lv, model, params, iters, lr, bar)
                synchronize(device)
                extra: Dict[str, Any] = {"transform": self.transform, "dof": model.n_params, "loss": self.loss_name,
                                         "voxels": int(lv.points.shape[0]), "optimizer": self.optimizer}
                if not stages:
                    extra.update(init=self.init, init_losses=init_losses, init_choice=best, radius_mm=radius,
                                 overlap_init=overlap)
                stages.append(StageRecord(name="affine", level=lv.factor, shape=list(lv.shape), iterations=iters,
                                          losses=losses, seconds=time.perf_counter() - t_start, extra=extra))
        finally:
            bar.close()
        with torch.no_grad():
            matrix = model.matrix(params)
            final_overlap = self._overlap(levels[-1], model, params)
        stages[-1].extra["overlap_final"] = final_overlap
        if final_overlap < self.min_overlap:
            raise InputError(f"{moving_name} -> {fixed_name}: the affine registration left the scans without overlap "
                             f"({100 * final_overlap:.1f}% of the fixed foreground inside the moving scan); try "
                             f"init=moments, a smaller lr or another loss")
        return AffineResult(matrix=matrix.detach().cpu().numpy().astype(np.float64), stages=stages)

    # -- set-up --------------------------------------------------------------------------------
    def _image(self, x, affine, name: str, device: torch.device) -> _Image:
        t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
        if t.dim() >= 4:
            if t.shape[0] != 1 or t.shape[1] != 1:
                raise InputError(f"{name}: expected (*spatial) or (1, 1, *spatial), got shape {tuple(t.shape)}")
            t = t[0, 0]
        if t.dim() not in (2, 3):
            raise InputError(f"{name}: expected a 2-D or 3-D image, got shape {tuple(t.shape)}")
        if min(t.shape) < 2:
            raise InputError(f"{name}: every axis needs at least 2 voxels, got shape {tuple(t.shape)}")
        a = world_affine(affine, t.dim(), name)
        arr = t.detach().to("cpu", torch.float64).numpy()
        if not np.isfinite(arr).all():
            raise InputError(f"{name}: contains {int((~np.isfinite(arr)).sum())} NaN/inf voxels")
        if arr.max() == arr.min():
            raise InputError(f"{name}: the image is constant ({arr.flat[0]:g}); there is nothing to register")
        arr = normalize_intensity(arr, self.normalize)
        if self.loss_name == "mi" and (arr.min() < 0 or arr.max() > 1):
            raise InputError(f"{name}: the mi loss needs intensities in [0, 1], got [{arr.min():.4g}, {arr.max():.4g}] "
                             f"with normalize='{self.normalize}'; use normalize=percentile or minmax")
        data = torch.from_numpy(arr.astype(np.float32))[None, None].to(device)
        return _Image(data, a, name)

    def _pooled_fixed(self, fix: _Image, factor: int) -> _Image:
        return _block_average(fix, _level_factors(fix.spacing, fix.shape, factor, float(fix.spacing.min())))

    def _pooled_moving(self, mov: _Image, fix: _Image, factor: int) -> _Image:
        return _block_average(mov, _level_factors(mov.spacing, mov.shape, factor, float(fix.spacing.min())))

    def _pyramid(self, mov: _Image, fix: _Image, centre: np.ndarray) -> List[_Level]:
        """The levels, coarse to fine; fixed points are stored relative to ``centre`` (mm), so that
        float32 keeps sub-micrometre precision whatever the world origin."""
        n = fix.data.dim() - 2
        device = fix.data.device
        sampled = self.loss_name in SAMPLED_LOSSES and self.samples > 0
        gen = torch.Generator().manual_seed(self.seed)
        c = torch.from_numpy(np.asarray(centre, np.float64))
        out = []
        for factor in self.levels:
            fl = self._pooled_fixed(fix, factor)
            ml = self._pooled_moving(mov, fix, factor)
            total = int(np.prod(fl.shape))
            values = fl.data.reshape(-1)
            if sampled and total > self.samples:
                # a fixed random subset of voxels, drawn before any coordinate is computed
                flat = torch.randperm(total, generator=gen)[: self.samples].sort().values
                values = values[flat.to(device)]
                out_shape = (len(flat),) + (1,) * (n - 1)
            else:
                flat = torch.arange(total)
                out_shape = fl.shape
            strides = np.cumprod((1,) + fl.shape[::-1])[:-1][::-1]   # C order: axis 0 varies slowest
            idx = torch.stack([(flat // int(st)) % sz for st, sz in zip(strides, fl.shape)], 1).double()
            pts = idx @ torch.from_numpy(fl.affine[:n, :n]).T + torch.from_numpy(fl.affine[:n, n])
            to_grid = _grid_normaliser(ml.shape) @ torch.from_numpy(np.linalg.inv(ml.affine))
            out.append(_Level(factor=factor, shape=fl.shape, points=(pts - c).float().to(device),
                              fixed=values.reshape(1, 1, *out_shape), out_shape=out_shape,
                              foreground=(values > self.foreground), moving=ml.data, to_grid=to_grid.to(device)))
        return out

    def _initial_linear(self, cov_f: np.ndarray, cov_m: np.ndarray, n: int) -> List[np.ndarray]:
        """Candidate starting linear parts ``L0``: the identity, and for ``init=moments`` the
        rotations taking each principal axis of the fixed foreground onto the moving one's, for
        every choice of axis signs that keeps a proper rotation (4 in 3-D, 2 in 2-D)."""
        cands = [np.eye(n)]
        if self.init != "moments":
            return cands
        ev_f, u_f = np.linalg.eigh(cov_f)
        ev_m, u_m = np.linalg.eigh(cov_m)
        scale = 1.0
        if self.transform != "rigid":  # the isotropic scale that matches the moments' volumes
            scale = float((np.prod(np.maximum(ev_m, 1e-12)) / np.prod(np.maximum(ev_f, 1e-12))) ** (1 / (2 * n)))
        for signs in itertools.product((1.0, -1.0), repeat=n):
            r = u_m @ np.diag(signs) @ u_f.T
            if np.linalg.det(r) > 0:
                cands.append(scale * r)
        return cands

    def _sample(self, lv: _Level, model: "_AffineModel", matrix: Tensor) -> Tensor:
        """The moving level image at the level's fixed points mapped by ``matrix``."""
        n = model.n
        g = lv.to_grid @ matrix
        lin, off = g[:n, :n], g[:n, :n] @ model.centre + g[:n, n]
        coords = lv.points @ lin.T.to(lv.points.dtype) + off.to(lv.points.dtype)
        grid = coords.flip(-1).reshape(1, *lv.out_shape, n)
        return F.grid_sample(lv.moving, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def _loss(self, lv: _Level, model: "_AffineModel", params: Tensor) -> Tensor:
        return self.loss_fn(self._sample(lv, model, model.matrix(params)), lv.fixed)

    def _overlap(self, lv: _Level, model: "_AffineModel", params: Tensor) -> float:
        """Fraction of the level's fixed foreground points that the transform maps inside the moving scan."""
        n = model.n
        g = lv.to_grid @ model.matrix(params)
        pts = lv.points[lv.foreground].double()
        if pts.shape[0] == 0:
            return 0.0
        coords = pts @ g[:n, :n].T + (g[:n, :n] @ model.centre + g[:n, n])
        return float((coords.abs() <= 1 + 1e-6).all(1).double().mean())

    # -- optimisation ------------------------------------------------------------------------
    def _optimise(self, lv: _Level, model: "_AffineModel", params: Tensor, iters: int, lr: float, bar) -> List[float]:
        losses: List[float] = []
        if iters == 0:
            return losses
        if self.optimizer == "lbfgs":
            opt = torch.optim.LBFGS([params], lr=1.0, max_iter=iters, max_eval=iters, history_size=10,
                                    tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = self._loss(lv, model, params)
                loss.backward()
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(level=lv.factor, loss=f"{losses[-1]:.5f}", refresh=False)
                return loss

            opt.step(closure)
            bar.update(max(0, iters - len(losses)))
            return losses
        opt = torch.optim.Adam([params], lr=lr)
        best, best_p = math.inf, params.detach().clone()
        for it in range(iters):
            # cosine decay from lr to lr * lr_floor within the level: big moves first, then settle
            frac = it / max(iters - 1, 1)
            for group in opt.param_groups:
                group["lr"] = lr * (self.lr_floor + (1 - self.lr_floor) * 0.5 * (1 + math.cos(math.pi * frac)))
            opt.zero_grad()
            loss = self._loss(lv, model, params)
            loss.backward()
            value = float(loss.detach())
            if value < best:  # the loss belongs to the parameters before this step
                best, best_p = value, params.detach().clone()
            opt.step()
            losses.append(value)
            bar.update(1)
            bar.set_postfix(level=lv.factor, loss=f"{value:.5f}", refresh=False)
        with torch.no_grad():
            final = float(self._loss(lv, model, params))
            if final > best:  # a deterministic objective: keep the best parameters seen
                params.copy_(best_p)
                final = best
        losses.append(final)
        return losses
