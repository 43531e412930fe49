"""Learn2Reg in and out: submission files, the challenge's metrics, and a ranking table.

The conventions follow the challenge's current evaluation code (MDL-UzL/L2R,
``evaluation/evaluation.py`` and ``evaluation/utils.py``, 2025) and are stated with a worked
example in ``docs/learn2reg.md``:

* a submission holds one displacement file per evaluation pair, named
  ``disp_<fixed case>_<fixed modality>_<moving case>_<moving modality>`` (always accepted) or
  ``disp_<fixed case>_<moving case>`` (accepted only when the fixed modality is ``0000`` and the
  moving one ``0001``), with ``.nii.gz`` or ``.npz``;
* the array is ``(X, Y, Z, 3)`` on the **fixed** grid, in **voxels**, component ``k`` along array
  axis ``k``, and pulls the moving image back: ``warped(x) = moving(x + disp(x))``. That is
  regkit's flow ``(1, 3, X, Y, Z)`` with the channel moved last, no flip and no sign change;
* the OASIS task of Learn2Reg 2021 took ``.npz`` files of ``(3, X/2, Y/2, Z/2)`` float16 (the
  full-resolution displacement in full-resolution voxels, sampled on a half-size grid), which
  its script upsampled with ``scipy.ndimage.zoom(order=2)`` (``fmt="npz_half"``).

``write_submission`` takes a ``predict(moving, fixed) -> flow`` callable, so any model (a
checkpoint's predictor, an optimiser, the identity) can produce a submission;
``score_submission`` scores a submission folder as the challenge does, with regkit's metrics.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from regkit.data.io import PathLike, atomic_write, load_volume, save_nifti
from regkit.data.keypoints import companion_path, read_keypoint_pair
from regkit.data.resample import resize_volume
from regkit.errors import InputError, MissingFileError, RegkitError, check_choice
from regkit.metrics import hd95, jacobian_metrics, keypoint_metrics, l2r_absent, l2r_dice, l2r_sdlogj
from regkit.spatial import identity_grid, jacobian_determinant

log = logging.getLogger("regkit")

SPLITS = {"val": "registration_val", "test": "registration_test", "train": "training_paired_images"}
FORMATS = ("nifti", "npz", "npz_half")
NAMINGS = ("auto", "short", "long")
_SUFFIX = {"nifti": ".nii.gz", "npz": ".npz", "npz_half": ".npz"}
_CASE = re.compile(r"(\d{4})_(\d{4})\.nii\.gz$")

# Per-case metrics, their direction and the quantile the challenge reports as its "30" column:
# the 70th percentile over cases for SDlogJ and TRE (the worst 30 %), the 30th for Dice and,
# as the challenge's code does, also for HD95 (where lower is better, so that is the best side).
# The regkit extras use the worst-30 % side.
HIGHER_IS_BETTER = {"DSC": True, "HD95": False, "SDlogJ": False, "TRE": False, "TRE_initial": False,
                    "nonpos_jac_pct": False}
QUANTILE_30 = {"DSC": 0.3, "HD95": 0.3, "SDlogJ": 0.7, "TRE": 0.7, "TRE_initial": 0.7, "nonpos_jac_pct": 0.7}
DESCRIPTIONS = {"DSC": "Dice, mean over the task's labels", "HD95": "HD95 in voxels, mean over the labels",
                "SDlogJ": "std of log(det J + 3) (the challenge's LogJacDetStd)",
                "TRE": "keypoint TRE after registration (mm)", "TRE_initial": "keypoint TRE before (mm)",
                "nonpos_jac_pct": "% voxels with det J <= 0 (regkit; the challenge reports 0 by construction)"}


# -- the task -----------------------------------------------------------------------------------
def case_ids(image: str) -> Tuple[str, str]:
    """``(case, modality)`` of a Learn2Reg image path, e.g. ``./imagesTr/OASIS_0395_0000.nii.gz``
    -> ``("0395", "0000")`` (the challenge reads the same fixed-width fields of the name)."""
    m = _CASE.search(image)
    if m is None:
        raise InputError(f"{image}: not a Learn2Reg image name <TASK>_<4-digit case>_<4-digit modality>.nii.gz, "
                         f"so its displacement file cannot be named")
    return m.group(1), m.group(2)


@dataclass(frozen=True)
class Case:
    """One evaluation pair of a task, its files (absolute) and the JSON's relative image paths."""

    fixed: Path
    moving: Path
    fixed_rel: str
    moving_rel: str
    fixed_label: Optional[Path] = None
    moving_label: Optional[Path] = None
    fixed_keypoints: Optional[Path] = None
    moving_keypoints: Optional[Path] = None
    fixed_mask: Optional[Path] = None

    @property
    def key(self) -> str:
        """The challenge's case key, ``<fixed case>_<fixed mod><--<moving case>_<moving mod>``."""
        (fc, fm), (mc, mm) = case_ids(self.fixed_rel), case_ids(self.moving_rel)
        return f"{fc}_{fm}<--{mc}_{mm}"

    def disp_stem(self, naming: str = "auto") -> str:
        """``disp_<fixed>_<fmod>_<moving>_<mmod>`` (``long``) or ``disp_<fixed>_<moving>`` (``short``);
        ``auto`` is short exactly where the current evaluation accepts it (fixed modality 0000,
        moving 0001), else long."""
        check_choice("naming", naming, NAMINGS)
        (fc, fm), (mc, mm) = case_ids(self.fixed_rel), case_ids(self.moving_rel)
        short_ok = fm == "0000" and mm == "0001"
        if naming == "short" or (naming == "auto" and short_ok):
            return f"disp_{fc}_{mc}"
        return f"disp_{fc}_{fm}_{mc}_{mm}"


class Task:
    """A Learn2Reg dataset JSON (``<TASK>_dataset.json``) and the folder it lies in.

    Companion files of an image entry are the JSON's ``label``, ``keypoints`` and ``mask``
    keys, else the challenge's paths beside the image (``labelsTr/``, ``keypointsTr/<name>.csv``,
    ``masksTr/``) when they exist. A file the JSON names that is missing is an error.
    """

    def __init__(self, json_path: PathLike) -> None:
        self.json_path = Path(json_path).expanduser()
        if not self.json_path.is_file():
            raise MissingFileError(f"{self.json_path}: dataset JSON not found")
        try:
            self.data = json.loads(self.json_path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.json_path}: not a readable JSON file ({exc})") from None
        if not isinstance(self.data, dict):
            raise InputError(f"{self.json_path}: expected a JSON object with 'registration_val' pairs")
        self.root = self.json_path.parent
        self.name = str(self.data.get("name", self.json_path.stem.replace("_dataset", "")))
        shape = (self.data.get("tensorImageShape") or {}).get("0")
        self.shape = tuple(int(v) for v in shape) if shape else None
        self.entries: Dict[str, dict] = {}
        for key in ("training", "test"):
            for entry in self.data.get(key) or []:
                if isinstance(entry, dict) and "image" in entry:
                    self.entries[entry["image"]] = entry

    def _path(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.root / p

    def _companion(self, image: str, key: str, folder: str, suffix: str) -> Optional[Path]:
        listed = self.entries.get(image, {}).get(key)
        if listed:
            p = self._path(listed)
            if not p.is_file():
                raise MissingFileError(f"{p}: the '{key}' file of {image} in {self.json_path} does not exist")
            return p
        derived = self._path(companion_path(image, folder, suffix))
        return derived if image.endswith(".nii.gz") and derived.is_file() else None

    def cases(self, split: str = "val") -> List[Case]:
        """The pairs of ``split`` (``val``, ``test`` or ``train``: the paired training images)."""
        check_choice("split", split, SPLITS)
        key = SPLITS[split]
        out = []
        for k, entry in enumerate(self.data.get(key) or []):
            if not isinstance(entry, dict) or "fixed" not in entry or "moving" not in entry:
                raise InputError(f"{self.json_path}: entry {k} of '{key}' needs 'fixed' and 'moving' paths, got {entry!r}")
            f, m = entry["fixed"], entry["moving"]
            for rel in (f, m):
                if not self._path(rel).is_file():
                    raise MissingFileError(f"{self._path(rel)}: image of '{key}' entry {k} in {self.json_path} not found")
            out.append(Case(self._path(f), self._path(m), f, m,
                            self._companion(f, "label", "labels", ".nii.gz"),
                            self._companion(m, "label", "labels", ".nii.gz"),
                            self._companion(f, "keypoints", "keypoints", ".csv"),
                            self._companion(m, "keypoints", "keypoints", ".csv"),
                            self._companion(f, "mask", "masks", ".nii.gz")))
        if not out:
            raise InputError(f"{self.json_path}: no '{key}' pairs (split '{split}')")
        return out


# -- writing a submission -----------------------------------------------------------------------
def half_shape(shape: Sequence[int]) -> Tuple[int, ...]:
    """The 2021 half-resolution grid: ``n / 2`` per axis (even sizes only: the challenge doubled
    the file's grid back with ``zoom(2)``, which cannot give an odd size)."""
    if any(int(n) % 2 for n in shape):
        raise InputError(f"npz_half needs even image sizes (the 2021 evaluation doubles the grid), got {tuple(shape)}")
    return tuple(int(n) // 2 for n in shape)


def displacement_array(flow: Tensor, fmt: str = "nifti") -> np.ndarray:
    """regkit's flow ``(1, 3, X, Y, Z)`` (voxels, fixed grid) as the array a submission holds.

    * ``nifti``: ``(X, Y, Z, 3)`` float32;
    * ``npz``: ``(X, Y, Z, 3)`` float16 (the current script reads any single-array ``.npz``);
    * ``npz_half``: ``(3, X/2, Y/2, Z/2)`` float16, the 2021 OASIS format. The field is sampled
      linearly on the half grid with the corner voxels aligned (the grid ``zoom(2)`` maps back
      onto), and its values stay in **full-resolution** voxels, as the 2021 script expects.
    """
    check_choice("submission format", fmt, FORMATS)
    if flow.dim() != 5 or flow.shape[:2] != (1, 3):
        raise InputError(f"a submission needs a 3-D flow (1, 3, X, Y, Z) in voxels, got shape {tuple(flow.shape)}")
    if not bool(torch.isfinite(flow).all()):
        raise InputError("the displacement has NaN/inf values")
    flow = flow.detach().double().cpu()
    if fmt == "npz_half":
        return resize_volume(flow, half_shape(flow.shape[2:]))[0].numpy().astype(np.float16)
    arr = flow[0].permute(1, 2, 3, 0).contiguous().numpy()
    return arr.astype(np.float32 if fmt == "nifti" else np.float16)


def write_displacement(path: PathLike, flow: Tensor, fmt: str = "nifti", affine: Optional[np.ndarray] = None) -> Path:
    """Write one submission file atomically (``affine``: the fixed image's, for NIfTI viewers; the
    evaluation ignores it)."""
    arr = displacement_array(flow, fmt)
    if fmt == "nifti":
        return save_nifti(path, arr, np.eye(4) if affine is None else affine,
                          description="regkit: Learn2Reg displacement, voxels, fixed grid")

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, arr)  # one positional array: 'arr_0'

    return atomic_write(path, write)


Predict = Callable[[Tensor, Tensor], Tensor]


def zero_predictor(moving: Tensor, fixed: Tensor) -> Tensor:
    """The identity transform: a zero displacement on the fixed grid (the challenge's baseline,
    and what it asks for in tasks a team does not take part in)."""
    return torch.zeros(1, fixed.dim() - 2, *fixed.shape[2:], dtype=torch.float32)


def write_submission(task: Union[Task, PathLike], predict: Predict, out_dir: PathLike, split: str = "val",
                     fmt: str = "nifti", naming: str = "auto", progress: bool = True) -> List[dict]:
    """Write the displacement file of every pair of ``split`` into ``out_dir``.

    Args:
        task: a :class:`Task` or the path of the dataset JSON.
        predict: ``predict(moving, fixed) -> flow``. It receives the two images as stored in the
            files, ``(1, 1, X, Y, Z)`` float32 on the CPU (normalising them as in training is the
            predictor's job), and returns the displacement ``(1, 3, X, Y, Z)`` in voxels on the
            fixed grid, regkit's convention (``warp(moving, flow)`` is the registered image).
        split: ``val``, ``test`` or ``train``.
        fmt: ``nifti`` (``.nii.gz``, current), ``npz`` (current, float16) or ``npz_half``
            (Learn2Reg 2021 OASIS).
        naming: ``auto``, ``short`` or ``long`` (:meth:`Case.disp_stem`).
    Returns:
        One ``{"case", "file", "seconds"}`` per pair (``seconds``: the predictor's time).
    """
    task = task if isinstance(task, Task) else Task(task)
    check_choice("submission format", fmt, FORMATS)
    check_choice("naming", naming, NAMINGS)
    cases = task.cases(split)
    out = Path(out_dir)
    written = []
    for case in tqdm(cases, desc=f"{task.name} {split} submission", unit="pair", disable=not progress):
        fixed, moving = load_volume(case.fixed), load_volume(case.moving)
        if task.shape is not None and tuple(fixed.data.shape) != task.shape:
            raise InputError(f"{case.fixed}: shape {fixed.data.shape}, but {task.json_path} says tensorImageShape {task.shape}")
        if moving.data.shape != fixed.data.shape:
            raise InputError(f"{case.moving}: shape {moving.data.shape} differs from fixed {case.fixed} {fixed.data.shape}")
        start = time.perf_counter()
        with torch.no_grad():
            flow = predict(torch.from_numpy(moving.data)[None, None], torch.from_numpy(fixed.data)[None, None])
        seconds = time.perf_counter() - start
        want = (1, 3) + tuple(fixed.data.shape)
        if not isinstance(flow, Tensor) or tuple(flow.shape) != want:
            got = tuple(flow.shape) if isinstance(flow, Tensor) else type(flow).__name__
            raise InputError(f"pair {case.key}: the predictor returned a displacement of shape {got}, expected {want} "
                             f"(voxels on the fixed grid)")
        path = out / (case.disp_stem(naming) + _SUFFIX[fmt])
        write_displacement(path, flow, fmt, fixed.affine)
        written.append({"case": case.key, "file": path, "seconds": seconds})
    return written


# -- reading a submission as the challenge does -------------------------------------------------
def find_displacement(folder: PathLike, case: Case) -> Optional[Path]:
    """The file the evaluation would read for ``case``: the short name where allowed, else the
    long one; ``.npz`` before ``.nii.gz``."""
    folder = Path(folder)
    (_, fm), (_, mm) = case_ids(case.fixed_rel), case_ids(case.moving_rel)
    stems = ([case.disp_stem("short")] if (fm, mm) == ("0000", "0001") else []) + [case.disp_stem("long")]
    for stem in stems:
        for ext in (".npz", ".nii.gz"):
            if (folder / (stem + ext)).is_file():
                return folder / (stem + ext)
    return None


def read_displacement(path: PathLike, expected_shape: Optional[Sequence[int]] = None) -> Tensor:
    """A current-format submission file as regkit's flow ``(1, 3, X, Y, Z)`` float64 (voxels).

    ``.nii.gz``: the data array (scaling applied); ``.npz``: its single array (any key), read as
    float32 as the challenge does. The array must be ``(X, Y, Z, 3)`` and, with
    ``expected_shape``, ``X, Y, Z`` must be that.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{p}: displacement file not found")
    try:
        if p.name.endswith(".nii.gz") or p.suffix == ".nii":
            arr = np.asarray(nib.load(str(p)).get_fdata(), dtype=np.float64)
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as npz:
                if len(npz.files) != 1:
                    raise InputError(f"{p}: a displacement .npz must hold exactly one array, found {len(npz.files)}")
                arr = npz[npz.files[0]].astype(np.float32).astype(np.float64)
        else:
            raise InputError(f"{p}: a displacement must be a .nii.gz or a .npz file")
    except RegkitError:
        raise
    except Exception as exc:
        raise InputError(f"{p}: cannot read the displacement ({type(exc).__name__}: {exc})") from None
    want = None if expected_shape is None else tuple(int(v) for v in expected_shape) + (3,)
    if arr.ndim != 4 or arr.shape[-1] != 3 or (want is not None and arr.shape != want):
        raise InputError(f"{p}: displacement of shape {'x'.join(map(str, arr.shape))}, expected "
                         f"{'x'.join(map(str, want)) if want else 'XxYxZx3'} (voxels on the fixed grid, components last)")
    if not np.isfinite(arr).all():
        raise InputError(f"{p}: the displacement has NaN/inf values")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(3, 0, 1, 2)))[None]


# -- the challenge's label warping and per-case metrics -----------------------------------------
def l2r_warp_labels(label_map: Tensor, flow: Tensor) -> Tensor:
    """Warp a label map as the challenge does: ``map_coordinates(moving, x + disp, order=0)``.

    The nearest voxel is ``floor(c + 0.5)`` (halves round up) and a sample position outside
    ``[0, n - 1]`` on any axis gives label 0 (scipy's ``mode="constant"``). regkit's
    ``warp(..., mode="nearest")`` rounds halves to even and keeps positions up to half a voxel
    beyond the border, so the two differ only on the outer voxel layer and at exact halves
    (identical for integer displacements).

    Args:
        label_map: ``(B, 1, *spatial)`` or ``(B, *spatial)`` integer labels (batch 1 broadcasts).
        flow: ``(B, ndim, *spatial)`` displacement in voxels.
    Returns:
        ``(B, 1, *spatial)`` int64.
    """
    lm = label_map if label_map.dim() == flow.dim() else label_map.unsqueeze(1)
    shape = flow.shape[2:]
    if tuple(lm.shape[2:]) != tuple(shape):
        raise InputError(f"label map {tuple(label_map.shape)} and flow {tuple(flow.shape)} must share the spatial shape")
    coords = identity_grid(shape, flow.device, torch.float64) + flow.double()
    inside = torch.ones_like(coords[:, 0], dtype=torch.bool)
    index = torch.zeros_like(coords[:, 0], dtype=torch.int64)
    for k, n in enumerate(shape):
        c = coords[:, k]
        inside &= (c >= 0) & (c <= n - 1)
        index = index * n + torch.floor(c + 0.5).clamp(0, n - 1).long()
    b = flow.shape[0]
    src = lm.reshape(lm.shape[0], -1).long().expand(b, -1)
    out = torch.gather(src, 1, index.reshape(b, -1)).reshape(b, *shape)
    return torch.where(inside, out, torch.zeros_like(out)).unsqueeze(1)


def case_metrics(flow: Tensor, fixed_label: Optional[Tensor] = None, moving_label: Optional[Tensor] = None,
                 labels: Optional[Sequence[int]] = None, fixed_kp=None, moving_kp=None, spacing=None,
                 mask: Optional[Tensor] = None, with_hd95: bool = True) -> Dict[str, float]:
    """The challenge's metrics of one pair, computed by regkit.

    Args:
        flow: ``(1, 3, X, Y, Z)`` displacement in voxels (fixed grid).
        fixed_label, moving_label, labels: label maps ``(X, Y, Z)`` or ``(1, 1, X, Y, Z)`` and
            the task's label values (DSC, HD95).
        fixed_kp, moving_kp: ``(N, 3)`` voxel coordinates (TRE); ``spacing``: the moving
            image's voxel size in mm.
        mask: the fixed image's mask, for tasks evaluated with masks (SDlogJ).
    Returns:
        ``SDlogJ`` and ``nonpos_jac_pct`` always; ``DSC`` (and ``HD95``) with labels; ``TRE``
        and ``TRE_initial`` with keypoints. Definitions: ``docs/learn2reg.md``.
    """
    flow = flow.double()
    det = jacobian_determinant(flow)  # once for both Jacobian metrics (seconds at full size)
    out = {"SDlogJ": float(l2r_sdlogj(flow, mask, det)[0]),
           "nonpos_jac_pct": float(jacobian_metrics(flow, det=det)["nonpos_jac_pct"][0])}
    if fixed_label is not None and moving_label is not None and labels:
        fl = fixed_label.reshape(1, 1, *flow.shape[2:])
        ml = moving_label.reshape(1, 1, *flow.shape[2:])
        warped = l2r_warp_labels(ml, flow)
        out["DSC"] = float(torch.nanmean(l2r_dice(warped, fl, ml, labels)[0]))
        if with_hd95:
            h = hd95(warped, fl, labels)  # spacing 1: the challenge reports HD95 in voxels
            h = torch.where(l2r_absent(fl, ml, labels), torch.full_like(h, math.nan), h)
            out["HD95"] = float(torch.nanmean(h[0]))
    if fixed_kp is not None and moving_kp is not None:
        k = keypoint_metrics(flow, fixed_kp, moving_kp, spacing)
        out["TRE"], out["TRE_initial"] = float(k["tre"][0]), float(k["tre_initial"][0])
    return out


def aggregate(cases: Mapping[str, Mapping[str, float]]) -> Dict[str, Dict[str, float]]:
    """The challenge's aggregates of per-case values: ``mean`` and ``std`` (population) over
    cases and ``30``, the quantile :data:`QUANTILE_30` (linear, ``np.quantile``). NaN cases
    propagate, as in the challenge's script."""
    metrics = list(dict.fromkeys(m for row in cases.values() for m in row))
    out = {}
    for m in metrics:
        v = np.array([row.get(m, math.nan) for row in cases.values()], dtype=np.float64)
        out[m] = {"mean": float(v.mean()), "std": float(v.std()), "30": float(np.quantile(v, QUANTILE_30.get(m, 0.7)))}
    return out


def _label_tensor(path: Path) -> Tensor:
    return torch.from_numpy(load_volume(path, np.int64, label=True).data)


def score_submission(task: Union[Task, PathLike], submission: PathLike, split: str = "val",
                     labels: Optional[Sequence[int]] = None, with_hd95: bool = True, masked: bool = False,
                     progress: bool = True) -> Dict[str, object]:
    """Score a submission folder as the challenge does (every file checked before any metric).

    Args:
        task: the :class:`Task` or its dataset JSON.
        submission: the folder of ``disp_*`` files.
        labels: the label values of DSC and HD95 (OASIS: 1..35). ``None``: every nonzero value
            of each pair's fixed label map.
        masked: restrict SDlogJ to the fixed image's mask (the lung tasks' ``masked_evaluation``).
    Returns:
        ``{"name", "split", "cases": {case key: {metric: value}}, "aggregates": {metric:
        {"mean", "std", "30"}}}``.
    """
    task = task if isinstance(task, Task) else Task(task)
    cases = task.cases(split)
    files = {c.key: find_displacement(submission, c) for c in cases}
    missing = [c.disp_stem("long") for c in cases if files[c.key] is None]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise MissingFileError(f"{submission}: no displacement file for {len(missing)} of {len(cases)} pairs, e.g. "
                               f"{', '.join(missing[:3])}{more} (.nii.gz or .npz)")
    results: Dict[str, Dict[str, float]] = {}
    for case in tqdm(cases, desc=f"scoring {task.name} {split}", unit="pair", disable=not progress):
        fixed_shape = nib.load(str(case.fixed)).shape[:3]
        flow = read_displacement(files[case.key], fixed_shape)
        fl = ml = kp_f = kp_m = spacing = mask = None
        if case.fixed_label is not None and case.moving_label is not None:
            fl, ml = _label_tensor(case.fixed_label), _label_tensor(case.moving_label)
        use = labels if labels is not None else (
            [int(v) for v in torch.unique(fl).tolist() if v != 0] if fl is not None else None)
        if case.fixed_keypoints is not None and case.moving_keypoints is not None:
            kp_f, kp_m = read_keypoint_pair(case.fixed_keypoints, case.moving_keypoints)
            spacing = tuple(float(s) for s in nib.load(str(case.moving)).header.get_zooms()[:3])
        if masked and case.fixed_mask is not None:
            mask = torch.from_numpy(load_volume(case.fixed_mask).data)
        elif masked:
            log.warning("no mask for %s: SDlogJ over the whole interior", case.fixed)
        results[case.key] = case_metrics(flow, fl, ml, use, kp_f, kp_m, spacing, mask, with_hd95)
    return {"name": task.name, "split": split, "cases": results, "aggregates": aggregate(results)}


# -- reports and ranking --------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.4f}"


def summary_markdown(result: Mapping[str, object]) -> str:
    """The aggregates of :func:`score_submission` as a markdown table."""
    agg = result["aggregates"]
    lines = [f"# Learn2Reg {result['name']}, split `{result['split']}`: {len(result['cases'])} pairs", "",
             "| metric | mean | std | 30 | what |", "|---|---|---|---|---|"]
    for m, s in agg.items():
        q = QUANTILE_30.get(m, 0.7)
        lines.append(f"| {m} | {_fmt(s['mean'])} | {_fmt(s['std'])} | {_fmt(s['30'])} | {DESCRIPTIONS.get(m, '')}; "
                     f"30 = {int(round(q * 100))}th percentile over pairs |")
    return "\n".join(lines) + "\n"


def write_report(result: Mapping[str, object], out_dir: PathLike) -> Dict[str, Path]:
    """``per_pair.csv``, ``summary.md`` and ``metrics.json`` (the challenge's JSON layout:
    ``name``, ``aggregates``, ``cases``) in ``out_dir``, each written atomically."""
    out = Path(out_dir)
    cases = result["cases"]
    columns = list(dict.fromkeys(m for row in cases.values() for m in row))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case"] + columns)
    for key, row in cases.items():
        w.writerow([key] + [f"{row[m]:.6g}" if m in row else "" for m in columns])
    doc = {"name": result["name"], "split": result["split"], "aggregates": result["aggregates"], "cases": cases,
           "eval": "regkit.learn2reg (docs/learn2reg.md)"}
    return {"csv": atomic_write(out / "per_pair.csv", lambda t: Path(t).write_text(buf.getvalue())),
            "markdown": atomic_write(out / "summary.md", lambda t: Path(t).write_text(summary_markdown(result))),
            "json": atomic_write(out / "metrics.json", lambda t: Path(t).write_text(json.dumps(doc, indent=2)))}


DEFAULT_COLUMNS = (("DSC", "mean"), ("DSC", "30"), ("HD95", "mean"), ("TRE", "mean"), ("TRE", "30"),
                   ("SDlogJ", "mean"))


def _ranks(values: Sequence[float], higher_is_better: bool) -> List[float]:
    """Ranks 1..n (1 = best), ties sharing their average rank; NaN ranks last."""
    keyed = [(-v if higher_is_better else v) if math.isfinite(v) else math.inf for v in values]
    order = sorted(range(len(keyed)), key=lambda i: keyed[i])
    ranks = [0.0] * len(keyed)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and keyed[order[j + 1]] == keyed[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_methods(results: Mapping[str, Mapping[str, Mapping[str, float]]],
                 columns: Optional[Sequence[Tuple[str, str]]] = None) -> Tuple[List[dict], str]:
    """Rank methods by the challenge's columns with regkit's documented mean-rank scheme.

    Args:
        results: ``{method: aggregates}``, the ``aggregates`` of :func:`score_submission`.
        columns: ``(metric, statistic)`` pairs, statistic ``mean`` or ``30``; default
            :data:`DEFAULT_COLUMNS` restricted to the metrics every method has.
    Returns:
        ``(rows, markdown)``: per method its column values and ranks (1 = best, ties share the
        average rank, NaN last) and the mean of its ranks; rows sorted by that mean rank (then
        by name). The challenge's final ranking adds significance tests and weights that its
        evaluation code does not contain; this is not that ranking.
    """
    if not results:
        raise InputError("rank_methods: no methods to rank")
    if columns is None:
        columns = [(m, s) for m, s in DEFAULT_COLUMNS if all(m in agg for agg in results.values())]
    if not columns:
        raise InputError("rank_methods: the methods share no ranked metric (DSC, HD95, TRE, SDlogJ)")
    for m, s in columns:
        check_choice("ranking statistic", s, ("mean", "std", "30"))
        check_choice("ranking metric", m, HIGHER_IS_BETTER)
    names = list(results)
    table = {(m, s): [float(results[n].get(m, {}).get(s, math.nan)) for n in names] for m, s in columns}
    ranks = {c: _ranks(v, HIGHER_IS_BETTER[c[0]]) for c, v in table.items()}
    rows = []
    for i, n in enumerate(names):
        row = {"method": n, "mean_rank": float(np.mean([ranks[c][i] for c in columns]))}
        for c in columns:
            row[f"{c[0]}{'' if c[1] == 'mean' else c[1]}"] = table[c][i]
            row[f"rank_{c[0]}{'' if c[1] == 'mean' else c[1]}"] = ranks[c][i]
        rows.append(row)
    rows.sort(key=lambda r: (r["mean_rank"], r["method"]))
    heads = [f"{m}{'' if s == 'mean' else s}" for m, s in columns]
    lines = ["| rank | method | mean rank | " + " | ".join(heads) + " |", "|---" * (3 + len(heads)) + "|"]
    for k, r in enumerate(rows, start=1):
        cells = [f"{_fmt(r[h])} ({r['rank_' + h]:g})" for h in heads]
        lines.append(f"| {k} | {r['method']} | {r['mean_rank']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: value (rank among the methods, 1 = best, ties share the average). Higher is better for DSC, "
              "lower for the others; `30` is the challenge's robustness column (DSC: 30th percentile over pairs; "
              "TRE: 70th). Methods are sorted by the mean of their ranks (regkit's scheme, docs/learn2reg.md)."]
    return rows, "\n".join(lines) + "\n"


# -- command line -------------------------------------------------------------------------------
def parse_labels(text: Optional[str]) -> Optional[List[int]]:
    """``"1-35"`` or ``"1,2,5-7"`` -> label list; ``None`` -> ``None``."""
    if text is None:
        return None
    out: List[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                out += list(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise InputError(f"--labels: '{part}' is not a label value or a range a-b (e.g. 1-35)") from None
    if not out:
        raise InputError(f"--labels: no label in '{text}'")
    return out
