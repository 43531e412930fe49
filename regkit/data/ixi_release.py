"""Convert the TransMorph IXI release (pickles) into regkit's NIfTI layout (``dataset=ixi``).

The release (``IXI_data/``: ``atlas.pkl``, ``Train/``, ``Val/``, ``Test/`` with ``subject_N.pkl``)
stores each volume as a pickled tuple ``(image, label)`` of 160×192×224 arrays: the image in
[0, 1], the label map with FreeSurfer IDs. This writes::

    <out>/atlas.nii.gz, <out>/atlas_label.nii.gz
    <out>/{train,val,test}/images/subject_N.nii.gz, <out>/{train,val,test}/labels/subject_N.nii.gz
    <out>/manifest.json          (counts, shapes, label values: written last)

and :func:`check` loads the result with the same loader training uses
(``scripts/convert_ixi_pkl.py`` is the command line).

SECURITY: pickle files can run code when they are loaded. This module unpickles with a
restricted unpickler that only rebuilds numpy arrays and plain tuples/lists, and refuses
anything else; still, convert only files from a source you trust.

The pickles carry no header: the voxel size is 1 mm (the release's resampling) and the
orientation is not recorded. By default the files get a 1 mm identity affine; ``affine`` (from
``--affine-from REF.nii.gz`` on the command line) gives that of a reference scan on the same grid.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from regkit.data.datasets import IXIData
from regkit.data.io import atomic_write, save_nifti
from regkit.errors import InputError, MissingFileError

IXI_SHAPE = (160, 192, 224)
SPLITS = {"Train": "train", "Val": "val", "Test": "test"}
# Globals a numpy array pickle needs (numpy 1.x and 2.x module paths); nothing else is allowed.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "tuple"), ("builtins", "list"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")


def load_pkl(path: Path):
    """``(image float32, label int)`` from one release file, checked."""
    if not path.exists():
        raise MissingFileError(f"{path}: no such file")
    try:
        with open(path, "rb") as fh:
            obj = _ArrayUnpickler(io.BufferedReader(fh)).load()
    except Exception as exc:
        raise InputError(f"{path}: not a readable (image, label) pickle ({type(exc).__name__}: {exc})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise InputError(f"{path}: expected a pickled (image, label) pair, got {type(obj).__name__}")
    image, label = (np.asarray(a) for a in obj)
    if image.shape != label.shape or image.ndim != 3:
        raise InputError(f"{path}: image {image.shape} and label {label.shape} must be equal 3-D shapes")
    if not np.isfinite(image).all():
        raise InputError(f"{path}: image has {int((~np.isfinite(image)).sum())} NaN/inf voxels")
    if np.issubdtype(label.dtype, np.floating) and not np.array_equal(label, np.round(label)):
        raise InputError(f"{path}: label map has non-integer values")
    return image.astype(np.float32), label.astype(np.int16)


def convert(src: Path, out: Path, affine=None, expect_shape=IXI_SHAPE, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Convert the release folder ``src`` into ``out`` (all or nothing); returns the manifest."""
    src, out = Path(src), Path(out)
    if not (src / "atlas.pkl").exists():
        raise MissingFileError(f"{src / 'atlas.pkl'}: not found (expected the IXI_data folder of the release)")
    if (out / "manifest.json").exists() and not overwrite:
        raise InputError(f"{out}: already converted (manifest.json exists); pass --overwrite to redo it")
    affine = np.eye(4) if affine is None else np.asarray(affine, np.float64)
    # Everything goes to a hidden folder beside ``out`` that is renamed into place at the end,
    # so a bad file or a crash leaves no half-converted dataset behind.
    out.parent.mkdir(parents=True, exist_ok=True)
    final, out = out, Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        manifest = _convert_into(src, out, affine, expect_shape, progress)
        if final.exists():
            shutil.rmtree(final)
        os.rename(out, final)
    finally:
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)
    return manifest


def _convert_into(src: Path, out: Path, affine, expect_shape, progress) -> dict:
    jobs = [(src / "atlas.pkl", out / "atlas.nii.gz", out / "atlas_label.nii.gz")]
    counts = {}
    for folder, split in SPLITS.items():
        files = sorted((src / folder).glob("*.pkl"), key=lambda p: (len(p.stem), p.stem)) \
            if (src / folder).is_dir() else []
        counts[split] = len(files)
        jobs += [(p, out / split / "images" / f"{p.stem}.nii.gz", out / split / "labels" / f"{p.stem}.nii.gz")
                 for p in files]
    if counts["train"] == 0:
        raise InputError(f"{src / 'Train'}: no subject_N.pkl files found")
    values, shapes = set(), set()
    for pkl, img_path, lab_path in tqdm(jobs, desc="converting IXI", unit="volume", disable=not progress):
        image, label = load_pkl(pkl)
        if expect_shape is not None and image.shape != tuple(expect_shape):
            raise InputError(f"{pkl}: shape {image.shape}, expected {tuple(expect_shape)} (use --any-shape to accept)")
        shapes.add(image.shape)
        values |= set(int(v) for v in np.unique(label))
        save_nifti(img_path, image, affine)
        save_nifti(lab_path, label, affine)
    manifest = {"source": str(src), "counts": counts, "shapes": sorted(list(s) for s in shapes),
                "label_values": sorted(values), "affine": affine.tolist()}
    atomic_write(out / "manifest.json", lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n"))
    return manifest


def check(out: Path, expect_shape=IXI_SHAPE) -> str:
    """Load the converted folder with ``dataset=ixi``'s loader (every file validated)."""
    data = IXIData(out, shape=expect_shape, validate="full").setup()
    counts = {k: len(v) for k, v in data.pairs.items()}
    item = data.datasets["train"][0]
    return (f"{out}: OK: {counts.get('train', 0)} train, {counts.get('val', 0)} val, "
            f"{counts.get('test', 0)} test pairs (atlas -> subject); volumes {tuple(item['fixed'].shape[1:])}, "
            f"image range [{float(item['fixed'].min()):.3f}, {float(item['fixed'].max()):.3f}], "
            f"{len(np.unique(item['fixed_label'].numpy())) - 1} nonzero labels in the first subject")
