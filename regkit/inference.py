"""NIfTI in, NIfTI out: register a moving scan to a fixed scan and write the results.

``regkit-register`` (:mod:`regkit.cli.register`) calls :func:`register_files`. Every output is
written on the FIXED image's voxel grid with its affine and (NIfTI) header:

* ``warped.nii.gz``: the moving image (original intensities) sampled through its own header at
  the world point ``A_fixed · (x + u(x))`` of each fixed voxel ``x`` (one interpolation);
* ``flow_voxel.nii.gz``: that displacement ``u`` in fixed voxels, ``(X, Y, Z, 1, 3)`` (NIfTI
  vector intent), component k along array axis k;
* ``flow_mm.nii.gz``: the same displacement in millimetres in the fixed image's world frame
  (NIfTI RAS+): ``u_mm(x) = A @ u_vox(x)`` with ``A`` the 3×3 part of the fixed affine, so an LIA
  or oblique scan gets correctly rotated and flipped vectors (ITK/ANTs use LPS: negate the
  first two components there);
* ``jacdet.nii.gz``: the Jacobian determinant of ``x + u(x)`` (volume ratio; <= 0 is folding);
* ``warped_label.nii.gz`` (with a moving label map): the label map sampled the same way;
* ``register.json``: inputs, options, the label interpolation and the metrics.

Every input is read and checked, and every output computed, before the first file is written;
each file is written atomically.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from regkit.data.io import Volume, atomic_write, check_output_folder, load_volume, save_nifti
from regkit.data.module import affine_mismatch
from regkit.data.resample import resample_to_grid, transform_points
from regkit.device import resolve_device
from regkit.errors import InputError, check_choice
from regkit.metrics import LABEL_MODES, dice, jacobian_metrics, resolve_labels, sample_labels
from regkit.predictor import INTENSITY_POLICIES, SHAPE_POLICIES, Predictor
from regkit.spatial import identity_grid, jacobian_determinant, sample_at

MOVING_GRIDS = ("world", "voxel")
OUTPUTS = ("warped", "flow_voxel", "flow_mm", "jacdet", "warped_label")


def same_grid(a: Volume, b: Volume) -> bool:
    return a.data.shape == b.data.shape and np.allclose(a.affine, b.affine, atol=1e-3, rtol=0)


def check_label(image: Volume, label: Optional[Volume]) -> None:
    """A label map must lie on its image's grid (shape and affine)."""
    if label is None:
        return
    if label.data.shape != image.data.shape:
        raise InputError(f"label map {label.path} has shape {label.data.shape} but its image {image.path} has {image.data.shape}")
    message = affine_mismatch(image.path, image.affine, label.path, label.affine)
    if message:
        raise InputError(message.replace(" (dataset.affine_check=warn to proceed anyway)", ""))


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))[None, None]


def moving_coordinates(flow: torch.Tensor, voxel_map: np.ndarray) -> torch.Tensor:
    """Moving-scan voxel positions ``voxel_map · (x + u(x))`` ``(1, ndim, *fixed)`` for a fixed-grid
    displacement ``flow`` (float64). ``voxel_map`` is ``inv(A_moving) · A_fixed`` (world mode)
    or the identity (voxel mode)."""
    points = identity_grid(flow.shape[2:], flow.device, torch.float64) + flow.double()
    return transform_points(voxel_map, points)


def registration_outputs(fixed: Volume, moving: Volume, flow: torch.Tensor, voxel_map: np.ndarray,
                         record: Dict[str, Any], moving_label: Optional[Volume] = None,
                         fixed_label: Optional[Volume] = None, label_mode: str = "nearest",
                         labels=None) -> Dict[str, tuple]:
    """Every output array of a registration given as the fixed-grid displacement ``flow``
    ``(1, ndim, *fixed)`` (voxels, the whole transformation): ``{name: (array, intent, description)}``.

    ``record`` (plain data) is completed with the Jacobian metrics and, when both label maps are
    given, the evaluated labels and Dice before/after.
    """
    flow = flow.double().cpu()
    coords = moving_coordinates(flow, voxel_map)
    warped = sample_at(_tensor(moving.data).double(), coords)[0, 0].float().numpy()
    det = jacobian_determinant(flow)[0]
    record.update({k: float(v[0]) for k, v in jacobian_metrics(flow).items()})
    u_vox = flow[0].permute(*range(1, flow.dim() - 1), 0).numpy()        # (X, Y, Z, 3)
    u_mm = u_vox @ fixed.affine[:3, :3].T                                  # A @ u per voxel
    arrays = {"warped": (warped.astype(np.float32), None, "warped moving image"),
              "flow_voxel": (u_vox[..., None, :].astype(np.float32), "vector", "displacement, voxels, axis k"),
              "flow_mm": (u_mm[..., None, :].astype(np.float32), "vector", "displacement, mm, world RAS"),
              "jacdet": (det.float().numpy(), None, "Jacobian determinant of x+u(x)")}
    if moving_label is not None:
        mlab = _tensor(moving_label.data)
        present = [int(v) for v in torch.unique(mlab) if v != 0]
        warped_label = sample_labels(mlab, coords, present, label_mode)
        arrays["warped_label"] = (warped_label[0, 0].numpy().astype(np.int32), None, f"warped labels ({label_mode})")
        record["label_mode"] = label_mode
        if fixed_label is not None:
            eval_labels = resolve_labels(labels) if labels is not None else None
            if not eval_labels:
                eval_labels = [int(v) for v in np.unique(fixed_label.data) if v != 0]
            target = _tensor(fixed_label.data)
            # "before": the moving labels where the headers alone put them (the identity transformation)
            before = sample_labels(mlab, moving_coordinates(torch.zeros_like(flow), voxel_map), present, "nearest")
            record["labels"] = [int(v) for v in eval_labels]
            record["dice_before"] = float(torch.nanmean(dice(before, target, eval_labels)))
            record["dice"] = float(torch.nanmean(dice(warped_label, target, eval_labels)))
    return arrays


def write_outputs(out_dir, fixed: Volume, arrays: Dict[str, tuple], record: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``arrays`` on the fixed grid (its affine and NIfTI header) and ``register.json``."""
    header = fixed.header if fixed.path is not None and str(fixed.path).endswith((".nii", ".nii.gz")) else None
    out = Path(out_dir)
    written = {}
    for name, (arr, intent, description) in arrays.items():
        written[name] = str(save_nifti(out / f"{name}.nii.gz", arr, fixed.affine, header=header, intent=intent,
                                       description=description))
    record["outputs"] = written
    atomic_write(out / "register.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))
    return record


# A registration worse than these is reported as suspect (no registration has Dice "before" and 0% folding).
DICE_DROP_WARN = 0.02
FOLDING_PCT_WARN = 1.0


def sanity_warnings(record: Dict[str, Any]) -> List[str]:
    """Warnings for a result far worse than no registration: Dice below the unregistered Dice
    (when labels are given), or more than 1% of the voxels folded (det J <= 0)."""
    warnings = []
    if "dice" in record and record["dice"] < record["dice_before"] - DICE_DROP_WARN:
        warnings.append(f"Dice fell from {record['dice_before']:.4f} (no registration) to {record['dice']:.4f}: this "
                        f"result is worse than not registering (check the intensities, the model and the pair)")
    if record.get("nonpos_jac_pct", 0.0) > FOLDING_PCT_WARN:
        warnings.append(f"{record['nonpos_jac_pct']:.2f}% of the voxels fold (det J <= 0; no registration has 0%): "
                        f"the field is not plausible (check the intensities, the model and the pair)")
    return warnings


def load_inputs(moving, fixed, moving_label=None, fixed_label=None):
    """Read and check the scans and label maps (one-line errors naming the file)."""
    mov = load_volume(moving, np.float32)
    fix = load_volume(fixed, np.float32)
    mlab = load_volume(moving_label, np.int64, label=True) if moving_label else None
    flab = load_volume(fixed_label, np.int64, label=True) if fixed_label else None
    check_label(mov, mlab)
    check_label(fix, flab)
    return mov, fix, mlab, flab


@torch.no_grad()
def register_files(checkpoint, moving, fixed, out_dir, moving_label=None, fixed_label=None,
                   shape_policy: str = "resample", moving_grid: str = "world", label_mode: str = "nearest",
                   labels=None, device: str = "auto", finetune_steps: int = 0,
                   finetune_lr: float = 1e-3, progress: bool = True, intensity: str = "rescale") -> Dict[str, Any]:
    """Register ``moving`` to ``fixed`` with the network of ``checkpoint`` and write the outputs
    listed in the module docstring. Returns the record also saved as ``register.json``.

    Args:
        shape_policy: input size != training size: ``resample`` (default), ``native`` or ``reject``
            (:class:`~regkit.predictor.Predictor`).
        moving_grid: a moving scan on another grid than the fixed one is compared through the two
            affines (``world``, default; the scans must be roughly aligned in world space) or
            voxel by voxel (``voxel``: headers ignored, equal sizes required).
        finetune_steps: instance optimisation of the network's weights on this pair first
            (:meth:`~regkit.predictor.Predictor.finetune`); the checkpoint file is not changed.
        intensity: scans far outside the training intensity range after the recorded
            normalisation: ``rescale`` onto it (default), ``error`` or ``keep``
            (:meth:`~regkit.predictor.Predictor.check_intensity`).
    """
    check_choice("shape policy", shape_policy, SHAPE_POLICIES)
    check_choice("moving grid", moving_grid, MOVING_GRIDS)
    check_choice("label_mode", label_mode, LABEL_MODES)
    check_choice("intensity policy", intensity, INTENSITY_POLICIES)
    if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 0:
        raise InputError(f"finetune_steps must be an integer >= 0, got {finetune_steps!r}")
    if not finetune_lr > 0:
        raise InputError(f"finetune_lr must be > 0, got {finetune_lr}")
    start = time.perf_counter()
    check_output_folder(out_dir)
    dev = resolve_device(device)
    predictor = Predictor.from_checkpoint(checkpoint, device=dev, shape_policy=shape_policy)
    if finetune_steps:
        predictor.training_loss()  # fails now, before any work, if the checkpoint has no loss
    mov, fix, mlab, flab = load_inputs(moving, fixed, moving_label, fixed_label)
    if mov.data.ndim != predictor.ndim:
        raise InputError(f"{moving}: {mov.data.ndim}-D volume, the model registers {predictor.ndim}-D images")
    notes: List[str] = []

    # 1. the moving scan on the fixed grid, as the network sees it, in the training intensity range
    prepared = []
    for vol, path in ((mov, moving), (fix, fixed)):
        image, note = predictor.check_intensity(predictor.normalize(vol.data), str(path), intensity)
        prepared.append(_tensor(image))
        if note:
            notes.append(note)
    mov_n, fix_n = prepared
    voxel_map = np.eye(mov.data.ndim + 1)
    if not same_grid(mov, fix):
        if moving_grid == "voxel":
            if mov.data.shape != fix.data.shape:
                raise InputError(f"moving {moving} has shape {mov.data.shape} but fixed {fixed} has {fix.data.shape}; "
                                 f"use --moving-grid world to resample it through the affines")
            notes.append("moving and fixed affines differ; headers ignored (--moving-grid voxel)")
        else:
            voxel_map = np.linalg.inv(mov.affine) @ fix.affine
            mov_n = resample_to_grid(mov_n, mov.affine, fix.affine, fix.data.shape)
            notes.append(f"moving {mov.data.shape} resampled onto the fixed grid {fix.data.shape} through the affines")
    predictor.network_shape(fix.data.shape)  # a refused size fails here, before any work
    m_in, f_in = mov_n.to(dev), fix_n.to(dev)

    # 2. the field
    finetune = predictor.finetune(m_in, f_in, finetune_steps, finetune_lr, progress).to_dict() if finetune_steps else None
    t0 = time.perf_counter()
    flow = predictor(m_in, f_in).flow
    net_seconds = time.perf_counter() - t0
    notes += predictor.notes

    # 3. outputs on the fixed grid
    record: Dict[str, Any] = {
        "checkpoint": str(checkpoint), "model": predictor.name, "moving": str(moving), "fixed": str(fixed),
        "moving_label": str(moving_label) if moving_label else None, "fixed_label": str(fixed_label) if fixed_label else None,
        "normalize": predictor.spec.normalize,
        "training_shape": list(predictor.spec.shape) if predictor.spec.shape else None,
        "network_shape": list(predictor.network_shape(fix.data.shape)), "shape_policy": shape_policy,
        "moving_grid": moving_grid, "label_mode": None, "notes": notes, "device": str(dev), "finetune": finetune,
    }
    if labels is None and predictor.spec.eval_labels:
        labels = list(predictor.spec.eval_labels)
    record["seconds_network"] = net_seconds
    arrays = registration_outputs(fix, mov, flow, voxel_map, record, mlab, flab, label_mode, labels)
    record["warnings"] = sanity_warnings(record)
    record["seconds_total"] = time.perf_counter() - start
    return write_outputs(out_dir, fix, arrays, record)
