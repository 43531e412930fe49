"""Reading and writing volumes (NIfTI ``.nii``/``.nii.gz`` and FreeSurfer ``.mgz``) safely.

Reads fail with one line naming the file: missing, unreadable, not 3-D (or 2-D where asked for),
non-finite values.
Writes go to a temporary file in the destination folder and are renamed into place, so a crash
never leaves a half-written output behind.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from regkit.errors import InputError, MissingFileError

PathLike = Union[str, "os.PathLike[str]"]
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")


@dataclass
class Volume:
    """A 3-D (or 2-D) array with its voxel-to-world affine (the file's 4×4) and the original header."""

    data: np.ndarray
    affine: np.ndarray
    header: object
    path: Optional[Path] = None

    @property
    def spacing(self):
        """Voxel size in mm along each array axis (from the affine's column norms)."""
        nd = self.data.ndim
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :nd] ** 2).sum(axis=0)))


def _nib():
    import nibabel  # local import: keeps `import regkit` light

    return nibabel


def load_volume(path: PathLike, dtype=np.float32, check_finite: bool = True, label: bool = False,
                ndim: Optional[int] = 3) -> Volume:
    """Load a 3-D volume (a trailing singleton 4th axis is dropped), or a 2-D image.

    Args:
        path: ``.nii``, ``.nii.gz``, ``.mgz`` or ``.mgh`` file.
        dtype: array dtype of the result (label maps: an integer dtype).
        check_finite: reject NaN/inf values.
        label: the file is a label map: its values must be integers (checked before casting).
        ndim: 3 (a 3-D volume, the default), 2 (a 2-D image: trailing singleton axes, as in a
            ``(X, Y, 1)`` NIfTI slice, are dropped) or ``None`` (either: trailing singleton axes
            are dropped and 2-D or 3-D is accepted). The affine stays the file's 4×4.
    """
    if ndim not in (2, 3, None):
        raise InputError(f"load_volume: ndim must be 2, 3 or None, got {ndim!r}")
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a folder, expected an image file")
    try:
        img = _nib().load(str(p))
        raw = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{p}: cannot read as a NIfTI/MGH image ({type(exc).__name__}: {exc})") from None
    if ndim == 3:
        if raw.ndim == 4 and raw.shape[3] == 1:
            raw = raw[..., 0]
    else:
        while raw.ndim > 2 and raw.shape[-1] == 1:
            raw = raw[..., 0]
    if ndim is not None and raw.ndim != ndim:
        raise InputError(f"{p}: expected a {ndim}-D {'volume' if ndim == 3 else 'image'}, got shape {raw.shape}")
    if raw.ndim not in (2, 3):
        raise InputError(f"{p}: expected a 2-D or 3-D image, got shape {raw.shape}")
    if check_finite and np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw).all():
        bad = int((~np.isfinite(raw)).sum())
        raise InputError(f"{p}: contains {bad} NaN/inf voxels")
    if label and np.issubdtype(raw.dtype, np.floating) and not np.array_equal(raw, np.round(raw)):
        raise InputError(f"{p}: label map has non-integer values (e.g. {raw[raw != np.round(raw)].flat[0]!r})")
    return Volume(data=raw.astype(dtype, copy=False), affine=np.asarray(img.affine, dtype=np.float64),
                  header=img.header, path=p)


def atomic_write(path: PathLike, write_fn) -> Path:
    """Call ``write_fn(tmp_path)`` then rename the temporary file onto ``path``."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(dest.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return dest


def save_nifti(path: PathLike, data: np.ndarray, affine: np.ndarray, header=None, dtype=None,
               intent: Optional[str] = None, description: Optional[str] = None) -> Path:
    """Write a NIfTI file atomically. ``header`` (e.g. the fixed image's) is copied when given;
    its intensity scaling and display range are reset (they described the source's values).
    ``intent`` (e.g. ``"vector"`` for a displacement field stored as ``(X, Y, Z, 1, 3)``) and
    ``description`` (80 characters) are written into the header."""
    nib = _nib()
    arr = np.asarray(data)
    if dtype is not None:
        arr = arr.astype(dtype)
    hdr = None
    if header is not None:
        hdr = header.copy() if isinstance(header, nib.Nifti1Header) else None
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64), header=hdr)
    img.set_data_dtype(arr.dtype)
    if hdr is not None:
        img.set_qform(affine, code=int(hdr["qform_code"]) or 1)
        img.set_sform(affine, code=int(hdr["sform_code"]) or 1)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, 0
    if intent is not None:
        img.header.set_intent(intent)
    if description is not None:
        img.header["descrip"] = description[:79].encode()
    return atomic_write(path, lambda tmp: nib.save(img, tmp))
