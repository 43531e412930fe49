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
from typing import Any, Optional, Union

import nibabel
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


def unreadable(path: PathLike, exc: Exception) -> InputError:
    """The one-line error for an image file nibabel cannot read (it raises many exception types)."""
    return InputError(f"{path}: cannot read as a NIfTI/MGH image ({type(exc).__name__}: {exc})")


def open_image(path: PathLike):
    """The nibabel image of a NIfTI/MGH file, header only (voxels are read on access), or a
    one-line error: missing file, a folder, or a file nibabel cannot read."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a folder, expected an image file")
    try:
        return nibabel.load(str(p))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise unreadable(p, exc) from None


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
    img = open_image(p)
    try:
        raw = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise unreadable(p, exc) from None
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


TEMP_MARK = ".tmp-"  # temporary files are ".<name>.tmp-<random><suffix>" beside their destination


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write_fn) -> Path:
    """Call ``write_fn(tmp_path)`` then rename the temporary file onto ``path``.

    The finished file gets the mode a plain ``open(path, "w")`` would give it (0666 less the
    umask), not the temporary file's 0600, so colleagues and viewers can read it. A destination
    that cannot be written (a file where a folder is expected, no permission, a read-only file
    system) is one :class:`InputError` naming it.
    """
    dest = Path(path)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(dest.suffixes) or ".tmp"
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}{TEMP_MARK}", suffix=suffix, dir=dest.parent)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"{dest.parent}: is not a folder (it exists as a file); choose another output folder") from None
    except OSError as exc:
        raise InputError(f"{dest.parent}: cannot write there ({exc.strerror or exc})") from None
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return dest


def remove_stale_temp_files(folder: PathLike) -> list:
    """Delete the temporary files :func:`atomic_write` leaves behind when its process is killed
    mid-write (a kill during a checkpoint write leaves a hidden, often empty ``.last.ckpt.tmp-*``).
    Call it on a folder no other process is writing to, e.g. a run's own checkpoint folder at its
    start. Returns the removed paths."""
    removed = []
    d = Path(folder)
    if d.is_dir():
        for f in d.glob(f".*{TEMP_MARK}*"):
            if f.is_file():
                f.unlink()
                removed.append(f)
    return removed


def check_output_folder(path: PathLike) -> Path:
    """Check, before any work, that an output folder can be written, without creating it (so that
    bad input leaves nothing behind): a file in its place or on its path, or a folder without write
    permission where it would be created, is one :class:`InputError`."""
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise InputError(f"{d}: exists and is not a folder; choose another output folder")
    existing = d
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{d}: cannot be created, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{d}: cannot write there ({existing}: permission denied)")
    return d


def save_nifti(path: PathLike, data: np.ndarray, affine: np.ndarray, header=None, dtype=None,
               intent: Optional[str] = None, description: Optional[str] = None) -> Path:
    """Write a NIfTI file atomically. ``header`` (e.g. the fixed image's) is copied when given;
    its intensity scaling and display range are reset (they described the source's values).
    ``intent`` (e.g. ``"vector"`` for a displacement field stored as ``(X, Y, Z, 1, 3)``) and
    ``description`` (80 characters) are written into the header."""
    arr = np.asarray(data)
    if dtype is not None:
        arr = arr.astype(dtype)
    img = nifti_image(arr, affine, header, intent, description)
    return atomic_write(path, lambda tmp: nibabel.save(img, tmp))


def nifti_image(arr: np.ndarray, affine: np.ndarray, header: Optional[Any] = None, intent: Optional[str] = None,
                description: Optional[str] = None) -> nibabel.Nifti1Image:
    """The image :func:`save_nifti` writes for ``arr`` (its dtype kept): ``header``'s fields when it
    is a NIfTI-1 header, both qform and sform set to ``affine``, scaling and display range reset,
    ``intent`` and ``description`` set. Also used to build the header of a file written in blocks
    (regkit.registration.distributed), which must be byte for byte this one."""
    hdr = header.copy() if isinstance(header, nibabel.Nifti1Header) else None
    img = nibabel.Nifti1Image(arr, np.asarray(affine, dtype=np.float64), header=hdr)
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
    return img
