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
from regkit.registration.affine import AffineRegistration
from regkit.registration.pipeline import Pipeline, list_presets, load_preset, plot_loss_curves, whole_flow
from regkit.registration.result import StageRecord
from regkit.registration.tfm import write_itk_tfm, write_matrix_txt
from regkit.registration.world import voxel_matrix, world_affine
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
    ndim = flow.shape[1]
    u_vox = flow[0].permute(*range(1, ndim + 1), 0).numpy()              # (X, Y[, Z], ndim)
    u_mm = u_vox @ fixed.affine[:ndim, :ndim].T                            # A @ u per voxel
    arrays = {"warped": (warped.astype(np.float32), None, "warped moving image"),
              "flow_voxel": (_vector_image(u_vox), "vector", "displacement, voxels, axis k"),
              "flow_mm": (_vector_image(u_mm), "vector", "displacement, mm, world RAS"),
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


def load_inputs(moving, fixed, moving_label=None, fixed_label=None, ndim: Optional[int] = 3):
    """Read and check the scans and label maps (one-line errors naming the file); ``ndim=None``
    also reads 2-D images."""
    mov = load_volume(moving, np.float32, ndim=ndim)
    fix = load_volume(fixed, np.float32, ndim=ndim)
    mlab = load_volume(moving_label, np.int64, label=True, ndim=ndim) if moving_label else None
    flab = load_volume(fixed_label, np.int64, label=True, ndim=ndim) if fixed_label else None
    check_label(mov, mlab)
    check_label(fix, flab)
    return mov, fix, mlab, flab


def _registration_outputs_extra(out: Dict[str, tuple], fixed: Volume, matrix, inverse: Optional[torch.Tensor]) -> None:
    """The affine alone (world matrix and ITK ``.tfm``) and the inverse field, when there are any."""
    if inverse is not None:
        ndim = inverse.shape[1]
        w = inverse[0].double().cpu().permute(*range(1, ndim + 1), 0).numpy()
        w_mm = w @ fixed.affine[:ndim, :ndim].T
        out["inverse_flow_voxel"] = (_vector_image(w), "vector", "inverse of the deformable part, voxels")
        out["inverse_flow_mm"] = (_vector_image(w_mm), "vector", "inverse of the deformable part, mm RAS")


def _vector_image(u: np.ndarray) -> np.ndarray:
    """A displacement ``(*spatial, ndim)`` as NIfTI's vector layout ``(X, Y, Z, 1, ndim)``."""
    while u.ndim < 4:  # 2-D fields get a singleton third axis
        u = u[..., None, :]
    return u[..., None, :].astype(np.float32)


def register_files(checkpoint, moving, fixed, out_dir, moving_label=None, fixed_label=None,
                   shape_policy: str = "resample", moving_grid: str = "world", label_mode: str = "nearest",
                   labels=None, device: str = "auto", finetune_steps: int = 0,
                   finetune_lr: float = 1e-3, progress: bool = True, intensity: str = "rescale",
                   preset: Optional[str] = None, affine: Optional[str] = None, refine: int = 0,
                   preset_overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Register ``moving`` to ``fixed`` and write the outputs listed in the module docstring.
    Returns the record also saved as ``register.json``.

    Without a ``checkpoint`` (``None``) the pair is registered by optimisation with the
    registration ``preset`` (``configs/registration/<name>.yaml``, default ``accurate``: the
    affine stage first, then the deformable stage), raw scans in any orientation. With one, its
    network predicts the field (:class:`~regkit.predictor.Predictor`), optionally after an
    affine stage (``affine``) and followed by ``refine`` iterations of field-level instance
    optimisation (the ``refine`` preset's stage, started from the network's field).

    Args:
        preset: the registration preset without a checkpoint (``accurate``, ``fast``, ``affine``...).
        affine: the affine stage: a preset name (``affine``) or ``none``; default: the preset's own
            (without a checkpoint), none (with one: the scans are compared through their headers).
        refine: with a checkpoint, iterations of field-level refinement of its prediction (0: off).
        preset_overrides: ``{dotted key: value}`` set in the preset before it is built, e.g.
            ``{"deformable.iterations": [50, 20]}`` (``--set`` on the command line).
        shape_policy: input size != training size: ``resample`` (default), ``native`` or ``reject``
            (:class:`~regkit.predictor.Predictor`).
        moving_grid: with a checkpoint and no affine stage, a moving scan on another grid than the
            fixed one is compared through the two affines (``world``, default) or voxel by voxel
            (``voxel``: headers ignored, equal sizes required).
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
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise InputError(f"refine must be an integer >= 0 (iterations), got {refine!r}")
    presets = list_presets()
    if preset is not None:
        check_choice("registration preset", preset, presets)
    if affine is not None and affine != "none":
        check_choice("affine preset", affine, presets)
    if checkpoint is None and (refine or finetune_steps):
        raise InputError("refine and finetune_steps act on a network's prediction: give a checkpoint (or a model name)")
    if checkpoint is not None and preset is not None:
        raise InputError(f"--preset {preset} registers by optimisation, without a network: leave out the checkpoint, "
                         f"or use --affine / --refine with it")
    check_output_folder(out_dir)
    if checkpoint is None:
        return _register_by_optimisation(moving, fixed, out_dir, moving_label, fixed_label, label_mode, labels,
                                         device, progress, preset or "accurate", affine, preset_overrides)
    start = time.perf_counter()
    dev = resolve_device(device)
    predictor = Predictor.from_checkpoint(checkpoint, device=dev, shape_policy=shape_policy)
    if finetune_steps:
        predictor.training_loss()  # fails now, before any work, if the checkpoint has no loss
    affine_stage = load_preset(affine, device=str(dev), progress=progress) if affine not in (None, "none") else None
    refine_pipeline = load_preset("refine", device=str(dev), progress=progress, **{"refine.iterations": refine,
                                                                              **dict(preset_overrides or {})}) \
        if refine else None
    mov, fix, mlab, flab = load_inputs(moving, fixed, moving_label, fixed_label)
    if mov.data.ndim != predictor.ndim:
        raise InputError(f"{moving}: {mov.data.ndim}-D volume, the model registers {predictor.ndim}-D images")
    if affine_stage is not None and moving_grid == "voxel":
        raise InputError("--moving-grid voxel ignores the headers, but an affine stage works in world coordinates")
    notes: List[str] = []
    seconds: Dict[str, float] = {}
    stages: List[StageRecord] = []

    # 1. the moving scan on the fixed grid (through the affine stage, or the headers)
    voxel_map = np.eye(mov.data.ndim + 1)
    matrix = None
    mov_raw = _tensor(mov.data)
    if affine_stage is not None:
        t0 = time.perf_counter()
        aff = affine_stage.register_volumes(mov, fix)
        matrix = np.asarray(aff.matrix, np.float64)
        stages += aff.stages
        seconds["affine"] = time.perf_counter() - t0
        voxel_map = np.linalg.inv(mov.affine) @ fix.affine
        mov_raw = sample_at(mov_raw.double(), transform_points(voxel_matrix(matrix, fix.affine, mov.affine),
                            identity_grid(fix.data.shape, dtype=torch.float64))).float()
        notes.append("moving scan aligned to the fixed one by the affine stage before the network")
    elif not same_grid(mov, fix):
        if moving_grid == "voxel":
            if mov.data.shape != fix.data.shape:
                raise InputError(f"moving {moving} has shape {mov.data.shape} but fixed {fixed} has {fix.data.shape}; "
                                 f"use --moving-grid world to resample it through the affines")
            notes.append("moving and fixed affines differ; headers ignored (--moving-grid voxel)")
        else:
            voxel_map = np.linalg.inv(mov.affine) @ fix.affine
            mov_raw = resample_to_grid(mov_raw, mov.affine, fix.affine, fix.data.shape)
            notes.append(f"moving {mov.data.shape} resampled onto the fixed grid {fix.data.shape} through the affines")

    # 2. in the training intensity range, as the network sees it
    prepared = []
    for image, path in ((mov_raw[0, 0].numpy(), moving), (fix.data, fixed)):
        image, note = predictor.check_intensity(predictor.normalize(image), str(path), intensity)
        prepared.append(_tensor(image))
        if note:
            notes.append(note)
    predictor.network_shape(fix.data.shape)  # a refused size fails here, before any work
    m_in, f_in = (t.to(dev) for t in prepared)

    # 3. the field: the network (after weight fine-tuning, if asked), then field-level refinement
    finetune = predictor.finetune(m_in, f_in, finetune_steps, finetune_lr, progress).to_dict() if finetune_steps else None
    t0 = time.perf_counter()
    flow = predictor(m_in, f_in).flow
    net_seconds = seconds["network"] = time.perf_counter() - t0
    notes += predictor.notes
    inverse = None
    if refine_pipeline is not None:
        t0 = time.perf_counter()
        refined = refine_pipeline.register(mov_raw[0, 0].numpy(), fix.data, init_flow=flow.float().cpu())
        flow, stages = refined.flow, stages + refined.stages
        seconds["refine"] = time.perf_counter() - t0
    if matrix is not None:
        flow = whole_flow(flow, matrix, fix.affine, fix.data.shape, device=flow.device)

    # 4. outputs on the fixed grid
    record: Dict[str, Any] = {
        "checkpoint": str(checkpoint), "model": predictor.name, "moving": str(moving), "fixed": str(fixed),
        "moving_label": str(moving_label) if moving_label else None, "fixed_label": str(fixed_label) if fixed_label else None,
        "normalize": predictor.spec.normalize,
        "training_shape": list(predictor.spec.shape) if predictor.spec.shape else None,
        "network_shape": list(predictor.network_shape(fix.data.shape)), "shape_policy": shape_policy,
        "moving_grid": moving_grid, "label_mode": None, "notes": notes, "device": str(dev), "finetune": finetune,
        "affine_stage": affine_stage.spec() if affine_stage is not None and hasattr(affine_stage, "spec") else None,
        "refine": refine_pipeline.spec() if refine_pipeline is not None else None,
    }
    if labels is None and predictor.spec.eval_labels:
        labels = list(predictor.spec.eval_labels)
    record["seconds_network"] = net_seconds
    return _finish(out_dir, fix, mov, flow, voxel_map, record, mlab, flab, label_mode, labels, matrix, inverse,
                   stages, seconds, start)


def _register_by_optimisation(moving, fixed, out_dir, moving_label, fixed_label, label_mode, labels, device,
                              progress, preset: str, affine: Optional[str],
                              preset_overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``register_files`` without a network: a registration preset's :class:`~regkit.registration.Pipeline`
    on the raw scans (any grids and orientations; the affine stage first unless told otherwise)."""
    start = time.perf_counter()
    stage = load_preset(preset, **dict(preset_overrides or {}))
    if isinstance(stage, Pipeline):
        pipeline = stage
        pipeline.device, pipeline.progress = device, progress
        if affine is not None:
            pipeline.affine = None if affine == "none" else load_preset(affine)
        pipeline.sync_progress()
    elif isinstance(stage, AffineRegistration):  # an affine preset on its own: affine-only registration
        pipeline = Pipeline(affine=stage, deformable=None, device=device, progress=progress)
    else:
        raise InputError(f"preset '{preset}' builds a {type(stage).__name__}, not a registration pipeline or stage")
    mov, fix, mlab, flab = load_inputs(moving, fixed, moving_label, fixed_label, ndim=None)
    if mov.data.ndim != fix.data.ndim:
        raise InputError(f"{moving} is {mov.data.ndim}-D but {fixed} is {fix.data.ndim}-D; register images of one "
                         f"dimension")
    ndim = fix.data.ndim
    a_m, a_f = world_affine(mov.affine, ndim, str(moving)), world_affine(fix.affine, ndim, str(fixed))
    result = pipeline.register((mov.data, a_m), (fix.data, a_f))
    matrix = result.affine.matrix if result.affine is not None else None
    inverse = result.deformable.inverse_flow if result.deformable is not None else None
    notes = ["the whole transformation (affine included) is flow_voxel/flow_mm"] if matrix is not None else []
    record: Dict[str, Any] = {
        "checkpoint": None, "preset": preset, "pipeline": pipeline.spec(), "moving": str(moving), "fixed": str(fixed),
        "moving_label": str(moving_label) if moving_label else None,
        "fixed_label": str(fixed_label) if fixed_label else None, "label_mode": None, "notes": notes,
        "device": str(resolve_device(device)),
    }
    voxel_map = np.linalg.inv(a_m) @ a_f
    return _finish(out_dir, fix, mov, result.flow, voxel_map, record, mlab, flab, label_mode, labels, matrix, inverse,
                   result.stages, dict(result.seconds), start)


def _finish(out_dir, fix: Volume, mov: Volume, flow, voxel_map, record, mlab, flab, label_mode, labels, matrix,
            inverse, stages: List[StageRecord], seconds: Dict[str, float], start: float) -> Dict[str, Any]:
    """Every output array, the records of the stages, and the files (all computed before any is written)."""
    arrays = registration_outputs(fix, mov, flow, voxel_map, record, mlab, flab, label_mode, labels)
    _registration_outputs_extra(arrays, fix, matrix, inverse)
    record["stages"] = [s.to_dict() for s in stages]
    record["seconds_per_stage"] = seconds
    record["affine_matrix"] = np.asarray(matrix).tolist() if matrix is not None else None
    record["warnings"] = sanity_warnings(record)
    record["seconds_total"] = time.perf_counter() - start
    out = Path(out_dir)
    if matrix is not None:
        check_output_folder(out)
        record["affine_files"] = {"world_matrix": str(write_matrix_txt(out / "affine.txt", matrix)),
                                  "itk": str(write_itk_tfm(out / "affine.tfm", matrix))}
    if any(s.losses for s in stages) and plot_loss_curves(stages, out / "loss_curve.png") is not None:
        record["loss_curve"] = str(out / "loss_curve.png")
    return write_outputs(out_dir, fix, arrays, record)
