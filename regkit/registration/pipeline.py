"""A whole registration: an optional affine stage, then a deformable (or refinement) stage, on
world-aware inputs, giving ONE field that holds the whole transformation.

Inputs are scans with their voxel-to-world affines (:class:`regkit.data.io.Volume`, or
``(array, affine)``), on any grids; or plain arrays/tensors on one grid (no affine stage then).
Conventions (see :mod:`regkit.registration.result`):

* the affine stage returns ``T`` (4×4, mm), fixed world -> moving world;
* the moving scan is resampled once onto the fixed grid through ``T``:
  ``m_aff(x) = moving(inv(A_m) @ T @ A_f @ x)``;
* the deformable stage registers ``m_aff`` to the fixed image on the fixed grid, giving ``d``;
* the whole field is ``u(x) = inv(A_f) @ T @ A_f @ (x + d(x)) - x`` (fixed voxels), so that
  sampling the moving scan through its own header at ``A_f @ (x + u(x))`` gives ``warped``
  (one interpolation of the original moving scan, not two).

Presets are YAML files in ``configs/registration/`` whose ``_target_`` names this class
(:func:`load_preset`). Their ``affine`` entry may name another preset (``affine: affine``),
instantiated in turn; ``null`` means the scans are already aligned.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor

from regkit.data.io import PathLike, Volume, atomic_write
from regkit.device import resolve_device
from regkit.errors import InputError, MissingFileError, check_choice, unknown_choice_message
from regkit.registration.deformable import DeformableRegistration, check_init_flow, check_pair
from regkit.registration.result import AffineResult, DeformableResult, RegistrationResult, StageRecord
from regkit.data.resample import transform_points
from regkit.registration.world import voxel_matrix
from regkit.spatial import identity_grid, sample_at

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "registration"
NORMALIZE = ("percentile", "minmax", "none")


# -- presets ------------------------------------------------------------------------------------
def list_presets(config_dir: Optional[PathLike] = None) -> List[str]:
    """Names of the preset YAML files (``configs/registration/<name>.yaml``)."""
    folder = Path(config_dir) if config_dir is not None else PRESET_DIR
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_preset(name: str, config_dir: Optional[PathLike] = None, **overrides: Any):
    """Instantiate the preset ``name`` (its ``_target_``), with top-level keys overridden, e.g.
    ``load_preset("accurate", affine=None)`` or ``load_preset("fast", progress=False)``.
    Unknown names raise :class:`InputError` listing the valid ones."""
    folder = Path(config_dir) if config_dir is not None else PRESET_DIR
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: preset folder not found")
    check_choice("registration preset", name, list_presets(folder))
    cfg = OmegaConf.load(folder / f"{name}.yaml")
    for key, value in overrides.items():
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not OmegaConf.is_dict(node) or leaf not in node:
            keys = sorted(str(k) for k in node) if OmegaConf.is_dict(node) else []
            raise InputError(unknown_choice_message(f"setting of preset '{name}'", key,
                                                    [f"{parent}.{k}" if parent else k for k in keys]))
        OmegaConf.update(cfg, key, value, merge=False)
    obj = instantiate(cfg, _convert_="all")
    if isinstance(obj, Pipeline) and isinstance(obj.affine, str):
        obj.affine = load_preset(obj.affine, folder)
        obj.sync_progress()
    return obj


# -- inputs -------------------------------------------------------------------------------------
def as_image(x: Any, name: str) -> Tuple[Tensor, Optional[np.ndarray]]:
    """``(1, 1, *spatial)`` float tensor and its affine (``None`` when not given) from a Volume,
    an ``(array, affine)`` pair, an array or a tensor (``(*spatial)`` or ``(1, 1, *spatial)``)."""
    affine = None
    if isinstance(x, Volume):
        x, affine = x.data, x.affine
    elif isinstance(x, tuple) and len(x) == 2:
        x, affine = x
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, Tensor) else x
    if t.dim() in (2, 3):
        t = t[None, None]
    if t.dim() not in (4, 5) or t.shape[:2] != (1, 1):
        raise InputError(f"{name}: expected a 2-D or 3-D image, (*spatial) or (1, 1, *spatial), got shape "
                         f"{tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    if affine is not None:
        affine = np.asarray(affine, dtype=np.float64)
        ndim = t.dim() - 2
        if affine.shape == (4, 4) and ndim == 2:  # a 2-D NIfTI's 4x4: its first two axes
            affine = affine[np.ix_([0, 1, 3], [0, 1, 3])]
        if affine.shape != (ndim + 1, ndim + 1) or not np.isfinite(affine).all():
            raise InputError(f"{name}: affine must be a finite {ndim + 1}x{ndim + 1} matrix for a {ndim}-D image, "
                             f"got shape {affine.shape}")
    return t, affine


def normalize_intensity(image: Tensor, mode: str, name: str) -> Tensor:
    """Map intensities to about [0, 1]: ``percentile`` (minimum -> 0, 99.9th percentile -> 1,
    clipped above), ``minmax`` or ``none``. A constant image is an error."""
    check_choice("intensity normalization", mode, NORMALIZE)
    if mode == "none":
        return image
    lo = image.amin()
    if mode == "minmax":
        hi = image.amax()
    else:
        flat = image.reshape(-1)
        if flat.numel() > 2 ** 22:  # quantile's input limit; a strided subset is plenty
            flat = flat[:: flat.numel() // 2 ** 22 + 1]
        hi = torch.quantile(flat.float(), 0.999).to(image.dtype)
        if not hi > lo:
            hi = image.amax()
    if not hi > lo:
        raise InputError(f"{name}: the image is constant ({float(lo)}); nothing to register")
    return ((image - lo) / (hi - lo)).clamp_(max=1.0)


def voxel_map(moving_affine: Optional[np.ndarray], fixed_affine: Optional[np.ndarray],
              matrix: Optional[np.ndarray], ndim: int) -> np.ndarray:
    """``inv(A_m) @ T @ A_f``: fixed voxel -> moving voxel (identities for missing parts)."""
    eye = np.eye(ndim + 1)
    return voxel_matrix(eye if matrix is None else matrix, eye if fixed_affine is None else fixed_affine,
                        eye if moving_affine is None else moving_affine)


def whole_flow(deformable: Optional[Tensor], matrix: Optional[np.ndarray], fixed_affine: Optional[np.ndarray],
               shape: Sequence[int], device=None) -> Tensor:
    """``u(x) = inv(A_f) @ T @ A_f @ (x + d(x)) - x`` ``(1, ndim, *shape)`` in fixed voxels,
    computed in float64 and returned in float32 (see the module docstring)."""
    ndim = len(shape)
    x = identity_grid(shape, device=device, dtype=torch.float64)
    pos = x if deformable is None else x + deformable.to(device=device, dtype=torch.float64)
    if matrix is not None:
        eye = np.eye(ndim + 1)
        a_f = eye if fixed_affine is None else fixed_affine
        pos = transform_points(np.linalg.inv(a_f) @ np.asarray(matrix, np.float64) @ a_f, pos)
    return (pos - x).float()


# -- the pipeline -------------------------------------------------------------------------------
class Pipeline:
    """Affine stage (optional), then deformable registration or refinement (optional).

    Args:
        affine: the affine stage: an object with ``register_volumes(moving_vol, fixed_vol)`` or
            ``__call__(moving_vol, fixed_vol)`` returning :class:`AffineResult`; a preset name
            (resolved by :func:`load_preset`); or ``None`` (the scans are aligned by their headers).
        deformable: a :class:`DeformableRegistration` (or ``None``: affine only).
        refine: the stage that runs instead of ``deformable`` when ``register`` is given an
            initial field (e.g. a :class:`~regkit.registration.refine.Refine`); without it, the
            deformable stage starts from that field.
        normalize: intensity normalisation before the deformable stage (``percentile``,
            ``minmax``, ``none``); ``warped`` keeps the original intensities.
        device: where the deformable stage runs (``auto``, ``cpu``, ``cuda``...).
        progress: tqdm bars of the stages (sets their ``progress``).
    """

    def __init__(self, affine: Any = None, deformable: Optional[DeformableRegistration] = None,
                 refine: Optional[DeformableRegistration] = None, normalize: str = "percentile",
                 device: Any = "auto", progress: bool = True) -> None:
        self.affine = affine
        self.deformable = deformable
        self.refine = refine
        self.normalize = check_choice("intensity normalization", normalize, NORMALIZE)
        self.device = device
        self.progress = bool(progress)
        self.sync_progress()

    def sync_progress(self) -> None:
        """Give every stage object the pipeline's ``progress`` setting."""
        for stage in (self.affine, self.deformable, self.refine):
            if stage is not None and not isinstance(stage, str) and hasattr(stage, "progress"):
                stage.progress = self.progress

    def __call__(self, moving: Any, fixed: Any, init_flow: Optional[Tensor] = None) -> RegistrationResult:
        return self.register(moving, fixed, init_flow)

    def _run_affine(self, moving: Tensor, fixed: Tensor, a_m, a_f) -> AffineResult:
        ndim = fixed.dim() - 2
        eye = np.eye(ndim + 1)
        a_m = eye if a_m is None else a_m
        a_f = eye if a_f is None else a_f
        stage = self.affine
        if hasattr(stage, "register_volumes") and ndim == 3:
            return stage.register_volumes(Volume(moving[0, 0].cpu().numpy(), a_m, None),
                                          Volume(fixed[0, 0].cpu().numpy(), a_f, None))
        if hasattr(stage, "register_volumes"):  # 2-D: the array call with (ndim+1)^2 affines
            return stage(moving[0, 0].cpu().numpy(), fixed[0, 0].cpu().numpy(), a_m, a_f)
        return stage(Volume(moving[0, 0].cpu().numpy(), a_m, None), Volume(fixed[0, 0].cpu().numpy(), a_f, None))

    def register(self, moving: Any, fixed: Any, init_flow: Optional[Tensor] = None) -> RegistrationResult:
        """Register ``moving`` to ``fixed`` (see the class and module docstrings).

        Args:
            moving, fixed: :class:`Volume`, ``(array, affine)``, or arrays/tensors on one grid.
            init_flow: ``(1, ndim, *fixed)`` voxels, a starting field for the moving image after
                the affine stage (e.g. a network's prediction on the aligned pair).
        Returns:
            :class:`RegistrationResult` whose ``flow`` is the whole transformation.
        """
        m, a_m = as_image(moving, "moving")
        f, a_f = as_image(fixed, "fixed")
        if m.dim() != f.dim():
            raise InputError(f"moving is {m.dim() - 2}-D {tuple(m.shape[2:])} but fixed is {f.dim() - 2}-D "
                             f"{tuple(f.shape[2:])}")
        for name, t in (("moving", m), ("fixed", f)):
            if not torch.isfinite(t).all():
                raise InputError(f"{name} image has {int((~torch.isfinite(t)).sum())} NaN/inf voxels")
        ndim = f.dim() - 2
        same_grid = m.shape == f.shape and (a_m is None or a_f is None or np.allclose(a_m, a_f, atol=1e-6))
        if (a_m is None) != (a_f is None):
            raise InputError("give affines for both scans or for neither")
        if a_m is None and not same_grid:
            raise InputError(f"moving {tuple(m.shape[2:])} and fixed {tuple(f.shape[2:])} are on different grids; "
                             f"give their affines (e.g. as regkit.data.io.Volume) so they can be resampled")
        if self.affine is not None and isinstance(self.affine, str):
            self.affine = load_preset(self.affine)
            self.sync_progress()
        device = resolve_device(self.device)
        records: List[StageRecord] = []
        seconds: Dict[str, float] = {}

        matrix = None
        affine_result = None
        if self.affine is not None:
            start = time.perf_counter()
            affine_result = self._run_affine(m, f, a_m, a_f)
            matrix = np.asarray(affine_result.matrix, np.float64)
            records.extend(affine_result.stages)
            seconds["affine"] = time.perf_counter() - start

        stage = self.refine if (init_flow is not None and self.refine is not None) else self.deformable
        deformable_result: Optional[DeformableResult] = None
        m_dev = m.to(device)
        if stage is not None:
            start = time.perf_counter()
            fixed_n = normalize_intensity(f.to(device), self.normalize, "fixed")
            if same_grid and matrix is None:
                moving_aff = m_dev
            else:
                vox = voxel_map(a_m, a_f, matrix, ndim)
                moving_aff = sample_at(m_dev, transform_points(vox, identity_grid(f.shape[2:], device, torch.float64)))
            moving_n = normalize_intensity(moving_aff, self.normalize, "moving")
            check_pair(moving_n, fixed_n, stage.name)
            init = None
            if init_flow is not None:
                check_init_flow(init_flow, f, stage.name)
                init = init_flow.to(device)
            deformable_result = stage(moving_n, fixed_n, init)
            records.extend(deformable_result.stages)
            seconds[stage.name] = time.perf_counter() - start
        elif init_flow is not None:
            raise InputError("an initial field was given but the pipeline has no deformable or refine stage")

        d = deformable_result.flow if deformable_result is not None else None
        flow = whole_flow(d, matrix, a_f, f.shape[2:], device)
        # warped = moving(inv(A_m) @ A_f @ (x + u(x))): one interpolation of the original scan.
        pos = identity_grid(f.shape[2:], device, torch.float64) + flow.double()
        warped = sample_at(m_dev, transform_points(voxel_map(a_m, a_f, None, ndim), pos))
        return RegistrationResult(flow=flow, warped=warped, affine=affine_result, deformable=deformable_result,
                                  stages=records, seconds=seconds)

    def spec(self) -> Dict[str, Any]:
        """Plain-data description (for register.json)."""
        out: Dict[str, Any] = {"normalize": self.normalize}
        for key in ("affine", "deformable", "refine"):
            stage = getattr(self, key)
            out[key] = None if stage is None else (stage.spec() if hasattr(stage, "spec") else type(stage).__name__)
        return out


# -- pictures -----------------------------------------------------------------------------------
def plot_loss_curves(stages: Sequence[StageRecord], path: PathLike, title: str = "registration loss") -> Optional[Path]:
    """Draw the loss after each iteration of every stage (one panel per stage kind, levels in
    turn along the iteration axis, dotted lines at level changes) into a PNG at ``path``.

    Returns the path, or ``None`` when matplotlib is not installed (it is optional: the
    ``bench``/``dev`` extras)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    kinds: Dict[str, List[StageRecord]] = {}
    for s in stages:
        if s.losses:
            kinds.setdefault(s.name, []).append(s)
    if not kinds:
        raise InputError("no stage recorded any loss; nothing to plot")
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.4), squeeze=False)
    for ax, (name, recs) in zip(axes[0], kinds.items()):
        offset = 0
        for r in recs:
            xs = np.arange(offset, offset + len(r.losses))
            ax.plot(xs, r.losses, label=f"level {r.level} ({'x'.join(map(str, r.shape))}), {r.seconds:.1f} s")
            if offset:
                ax.axvline(offset, color="0.7", ls=":")
            offset += len(r.losses)
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss (lower is better)")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    dest = Path(path)
    atomic_write(dest, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return dest
