"""Raw scans to a training set (``regkit-prepare``): align a folder of scans affinely to an atlas,
write them and their label maps on the atlas grid, and write the pair list ``dataset=pairs`` reads.

This is the IXI-style preprocessing for a user's own data. Each scan (any grid, orientation and
voxel size; ``.nii``, ``.nii.gz``, ``.mgz``, ``.mgh``) is registered to the atlas by
:class:`~regkit.registration.affine.AffineRegistration` in world space (the atlas is the fixed
image), then resampled onto the atlas grid: images linearly, in their original intensities
(float32), label maps by nearest neighbour (integers). Every output carries the atlas's affine
and, for a NIfTI atlas, its header.

Which file is whose label map:

* **naming rule** (a folder): a file whose name without extension ends with one of the label
  suffixes (default ``_seg``, ``_label``, ``_labels``, ``_aseg``) is the label map of the file
  with the same name without that suffix, e.g. ``sub01_seg.nii.gz`` is ``sub01.mgz``'s;
* **a CSV** (``--subjects list.csv``) with the columns ``image`` and optionally ``label`` and
  ``name`` (relative paths are relative to the CSV's folder).

Outputs in the output folder::

    atlas.nii.gz [atlas_label.nii.gz]     the atlas (and its labels) as given, for self-contained pairs
    images/<name>.nii.gz                  each scan on the atlas grid
    labels/<name>.nii.gz                  its label map on the atlas grid, when it has one
    transforms/<name>.txt, <name>.tfm     the affine: atlas world -> scan world (p_scan = M p_atlas,
                                          RAS mm), and the same for ITK (LPS, physical; see tfm.py)
    pairs.csv                             id,moving,fixed,moving_label,fixed_label (paths relative to it)
    prepare.json                          per scan: status, matrix, the affine stage's records (losses per
                                          level), seconds, or the reason it was skipped

Pairings (``--pairs``): ``atlas-to-subject`` (moving = atlas, fixed = scan: the IXI protocol, the
default), ``subject-to-atlas``, ``all`` (every ordered pair of distinct scans) or ``none``.

It is resumable: a scan whose ``transforms/<name>.txt`` exists (written last, after its image and
label map) is kept as it is unless ``--overwrite``. A scan that cannot be read or registered is
reported in one line and skipped; the others go on. Every file is written atomically.
"""
from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import nibabel
import numpy as np
import torch
from tqdm.auto import tqdm

from regkit.data.io import VOLUME_SUFFIXES, PathLike, Volume, atomic_write, load_volume, save_nifti
from regkit.data.pairs import Pair, write_pairs_csv
from regkit.errors import InputError, MissingFileError, RegkitError, check_choice
from regkit.registration.affine import AffineRegistration
from regkit.registration.tfm import write_itk_tfm, write_matrix_txt
from regkit.registration.world import resample_world

log = logging.getLogger("regkit")

LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_aseg")
PAIRINGS = ("atlas-to-subject", "subject-to-atlas", "all", "none")


@dataclass(frozen=True)
class Subject:
    name: str
    image: Path
    label: Optional[Path] = None


def volume_stem(path: PathLike) -> Optional[str]:
    """The file name without its volume extension, or ``None`` if it is not a volume file."""
    name = Path(path).name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def find_subjects(folder: PathLike, label_suffixes: Sequence[str] = LABEL_SUFFIXES) -> Tuple[List[Subject], List[str]]:
    """Scans of a folder (not recursive) and their label maps by the naming rule (module
    docstring). Returns the subjects, sorted by name, and one-line notes on files left out."""
    root = Path(folder)
    if not root.is_dir():
        raise MissingFileError(f"{root}: no such folder")
    images: Dict[str, List[Path]] = {}
    labels: Dict[str, List[Path]] = {}
    for p in sorted(root.iterdir()):
        stem = volume_stem(p)
        if stem is None or not p.is_file() or p.name.startswith("."):
            continue
        suffix = next((s for s in label_suffixes if s and stem.endswith(s) and len(stem) > len(s)), None)
        if suffix is not None:
            labels.setdefault(stem[: -len(suffix)], []).append(p)
        else:
            images.setdefault(stem, []).append(p)
    subjects, notes = [], []
    for name, paths in sorted(images.items()):
        found = labels.pop(name, [])
        if len(paths) > 1:
            notes.append(f"{', '.join(str(p) for p in paths)}: several scans named '{name}'; skipped (rename one)")
            continue
        if len(found) > 1:
            notes.append(f"{paths[0]}: several label maps ({', '.join(p.name for p in found)}); skipped")
            continue
        subjects.append(Subject(name, paths[0], found[0] if found else None))
    for name, paths in sorted(labels.items()):
        notes.append(f"{paths[0]}: label map without a scan named '{name}'; left out")
    return subjects, notes


def read_subjects_csv(path: PathLike) -> List[Subject]:
    """Subjects from a CSV with columns ``image`` [, ``label``] [, ``name``]."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{p}: subject list not found")
    with open(p, newline="") as fh:
        reader = csv.DictReader(fh)
        if "image" not in (reader.fieldnames or []):
            found = ", ".join(reader.fieldnames or []) or "none"
            raise InputError(f"{p}: missing column 'image' (found columns: {found})")
        subjects = []
        for line, row in enumerate(reader, start=2):
            image = (row.get("image") or "").strip()
            if not image:
                raise InputError(f"{p}:{line}: empty 'image'")
            label = (row.get("label") or "").strip()
            resolve = lambda v: Path(v) if Path(v).is_absolute() else p.parent / v
            name = (row.get("name") or "").strip() or volume_stem(image) or Path(image).name
            subjects.append(Subject(name, resolve(image), resolve(label) if label else None))
    names = [s.name for s in subjects]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"{p}: subject names must be unique, repeated: {', '.join(dup)} (add a 'name' column)")
    return subjects


def _label_dtype(data: np.ndarray):
    lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
    for dt in (np.uint8, np.int16, np.int32):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return dt
    raise InputError(f"label values [{lo}, {hi}] do not fit in int32")


def _nifti_header(vol: Volume):
    return vol.header if isinstance(vol.header, nibabel.Nifti1Header) else None


def _outputs(out: Path, name: str) -> Dict[str, Path]:
    return {"image": out / "images" / f"{name}.nii.gz", "label": out / "labels" / f"{name}.nii.gz",
            "matrix": out / "transforms" / f"{name}.txt", "tfm": out / "transforms" / f"{name}.tfm"}


def _prepare_one(subject: Subject, atlas: Volume, out: Path, registration: AffineRegistration) -> Dict[str, Any]:
    """Register one scan to the atlas and write its outputs (the transform last)."""
    t0 = time.perf_counter()
    vol = load_volume(subject.image)
    lab = None
    if subject.label is not None:
        lab = load_volume(subject.label, np.int64, label=True)
        if lab.data.shape != vol.data.shape:
            raise InputError(f"label map {subject.label} has shape {lab.data.shape} but its scan {subject.image} has "
                             f"{vol.data.shape}")
        if not np.allclose(lab.affine, vol.affine, atol=1e-3):
            raise InputError(f"label map {subject.label} has another affine than its scan {subject.image}")
    result = registration.register_volumes(vol, atlas)
    paths = _outputs(out, subject.name)
    header = _nifti_header(atlas)
    image = resample_world(torch.from_numpy(np.ascontiguousarray(vol.data, np.float32))[None, None], vol.affine,
                           atlas.affine, atlas.data.shape, result.matrix)[0, 0].numpy()
    save_nifti(paths["image"], image, atlas.affine, header, dtype=np.float32,
               description=f"regkit-prepare: {subject.image.name} on the atlas grid")
    if lab is not None:
        warped = resample_world(torch.from_numpy(lab.data)[None, None], vol.affine, atlas.affine, atlas.data.shape,
                                result.matrix, mode="nearest")[0, 0].numpy()
        save_nifti(paths["label"], warped, atlas.affine, header, dtype=_label_dtype(warped),
                   description=f"regkit-prepare: {subject.label.name} on the atlas grid")
    write_itk_tfm(paths["tfm"], result.matrix)
    write_matrix_txt(paths["matrix"], result.matrix)      # last: its presence marks the scan as done
    return {"status": "done", "seconds": time.perf_counter() - t0, "matrix": result.matrix.tolist(),
            "stages": [st.to_dict() for st in result.stages]}


def _pairs(done: List[Subject], out: Path, atlas_path: Path, atlas_label: Optional[Path], pairing: str) -> List[Pair]:
    def files(s: Subject):
        p = _outputs(out, s.name)
        return p["image"], (p["label"] if s.label is not None else None)

    pairs: List[Pair] = []
    if pairing in ("atlas-to-subject", "subject-to-atlas"):
        for s in done:
            img, lab = files(s)
            both = lab is not None and atlas_label is not None
            if pairing == "atlas-to-subject":
                pairs.append(Pair(atlas_path, img, atlas_label if both else None, lab if both else None,
                                  f"atlas->{s.name}"))
            else:
                pairs.append(Pair(img, atlas_path, lab if both else None, atlas_label if both else None,
                                  f"{s.name}->atlas"))
    elif pairing == "all":
        for a in done:
            for b in done:
                if a.name != b.name:
                    (ia, la), (ib, lb) = files(a), files(b)
                    both = la is not None and lb is not None
                    pairs.append(Pair(ia, ib, la if both else None, lb if both else None, f"{a.name}->{b.name}"))
    return pairs


def prepare_dataset(out: PathLike, atlas: PathLike, raw: Optional[PathLike] = None,
                    subjects_csv: Optional[PathLike] = None, atlas_label: Optional[PathLike] = None,
                    pairs: str = "atlas-to-subject", registration: Optional[AffineRegistration] = None,
                    overwrite: bool = False, label_suffixes: Sequence[str] = LABEL_SUFFIXES,
                    progress: bool = True) -> Dict[str, Any]:
    """Align the scans of ``raw`` (or of ``subjects_csv``) to ``atlas`` and write the training set
    under ``out`` (module docstring). Returns the summary also written to ``prepare.json``."""
    check_choice("pairs", pairs, PAIRINGS)
    if (raw is None) == (subjects_csv is None):
        raise InputError("give either a folder of raw scans or a subject CSV (--subjects), not both or neither")
    out = Path(out)
    atlas_vol = load_volume(atlas)
    atlas_lab = load_volume(atlas_label, np.int64, label=True) if atlas_label is not None else None
    if atlas_lab is not None and (atlas_lab.data.shape != atlas_vol.data.shape
                                  or not np.allclose(atlas_lab.affine, atlas_vol.affine, atol=1e-3)):
        raise InputError(f"atlas label map {atlas_label} is not on the grid of the atlas {atlas} (shape "
                         f"{atlas_lab.data.shape} vs {atlas_vol.data.shape}, or another affine)")
    if raw is not None:
        subjects, notes = find_subjects(raw, label_suffixes)
    else:
        subjects, notes = read_subjects_csv(subjects_csv), []
    if not subjects:
        raise InputError(f"{raw or subjects_csv}: no scans found (.nii, .nii.gz, .mgz, .mgh)")
    registration = registration if registration is not None else AffineRegistration(progress=False)
    for note in notes:
        tqdm.write(f"note: {note}")

    header = _nifti_header(atlas_vol)
    atlas_out = out / "atlas.nii.gz"
    atlas_label_out = out / "atlas_label.nii.gz" if atlas_lab is not None else None
    if overwrite or not atlas_out.exists():
        save_nifti(atlas_out, atlas_vol.data, atlas_vol.affine, header, dtype=np.float32)
    if atlas_lab is not None and (overwrite or not atlas_label_out.exists()):
        save_nifti(atlas_label_out, atlas_lab.data, atlas_vol.affine, header, dtype=_label_dtype(atlas_lab.data))

    records: Dict[str, Dict[str, Any]] = {}
    done: List[Subject] = []
    bar = tqdm(subjects, desc="aligning to the atlas", unit="scan", disable=not progress, dynamic_ncols=True)
    for s in bar:
        bar.set_postfix_str(s.name, refresh=False)
        record: Dict[str, Any] = {"image": str(s.image), "label": str(s.label) if s.label else None}
        paths = _outputs(out, s.name)
        complete = paths["matrix"].exists() and paths["image"].exists() and (s.label is None or paths["label"].exists())
        if complete and not overwrite:
            record["status"] = "kept"
            done.append(s)
        else:
            try:
                record.update(_prepare_one(s, atlas_vol, out, registration))
                done.append(s)
            except RegkitError as exc:     # unreadable, NaN, no overlap, mismatched label map: skip this one
                record.update(status="skipped", error=str(exc))
                tqdm.write(f"skipped {s.image}: {exc}")
        records[s.name] = record
    bar.close()
    if not done:
        raise InputError(f"none of the {len(subjects)} scans could be prepared (reasons above)")

    pair_list = _pairs(done, out, atlas_out, atlas_label_out, pairs)
    csv_path = out / "pairs.csv"
    if pairs != "none":
        atomic_write(csv_path, lambda tmp: write_pairs_csv(tmp, pair_list, relative_to=out))
    summary = {"atlas": str(atlas), "atlas_label": str(atlas_label) if atlas_label else None, "pairs": pairs,
               "pairs_csv": str(csv_path) if pairs != "none" else None, "n_pairs": len(pair_list),
               "registration": {k: getattr(registration, k) for k in (
                   "transform", "loss_name", "init", "levels", "iterations", "optimizer", "samples")},
               "notes": notes, "subjects": records}
    atomic_write(out / "prepare.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    return summary
