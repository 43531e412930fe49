"""Writing and reading an affine transform on its own: a plain-text 4×4 world matrix, and ITK's
``.tfm`` text format (read by ITK, SimpleITK, ANTs, 3D Slicer, ITK-SNAP).

Direction conventions:

* regkit's world matrix ``T`` (:mod:`regkit.registration.result`) maps a point of the FIXED
  image's world (RAS, mm, through the NIfTI affines) to the MOVING image's:
  ``p_moving = T @ p_fixed``. The text file holds exactly that matrix (``ndim + 1`` rows).
* ITK's transform maps FIXED physical points to MOVING physical points, the same direction (a
  registration's output transform is what a resampler applies to each output point to find
  where to read the moving image), but ITK's physical space is LPS: ``x_lps = D x_ras`` with
  ``D = diag(-1, -1, 1, 1)`` (``diag(-1, -1, 1)`` in 2-D). So the ITK matrix is
  ``T_itk = D @ T @ D`` and conversely (``D`` is its own inverse).
* An ITK ``AffineTransform_double_3_3`` stores ``Parameters``: the 3×3 matrix ``M`` row by row
  then a translation ``t``, and ``FixedParameters``: a centre ``c``, with
  ``x -> M (x - c) + c + t``. :func:`write_itk_tfm` writes ``c = 0`` (so ``t`` is the offset) and
  a PHYSICAL-space transform. :func:`read_itk_tfm` accepts any centre, the ``float`` and
  ``MatrixOffsetTransformBase`` variants, and a ``CompositeTransform`` of affine transforms
  (ITK applies a composite's transforms in reverse order of the file, so the first one listed
  is applied last: ``T = T_1 @ T_2 @ ...``).

Some tools write ``.tfm`` files that map voxel INDICES instead (e.g. the shared data's
``*_to_common_affine.tfm``, fixed index -> moving index); read those with ``space="index"``,
which returns ITK's matrix as it is (no LPS flip), and convert with
:func:`regkit.registration.world.world_from_voxel_matrix`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List

import numpy as np

from regkit.data.io import PathLike, atomic_write
from regkit.errors import InputError, MissingFileError, check_choice

ITK_HEADER = "#Insight Transform File V1.0"
_AFFINE_TYPES = ("AffineTransform", "MatrixOffsetTransformBase")
SPACES = ("physical", "index")


def _ras_lps(n: int) -> np.ndarray:
    d = np.eye(n + 1)
    d[0, 0] = d[1, 1] = -1.0
    return d


def _check_matrix(matrix, what: str) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape not in ((3, 3), (4, 4)):
        raise InputError(f"{what}: expected a 3x3 (2-D) or 4x4 (3-D) homogeneous matrix, got shape {m.shape}")
    n = m.shape[0] - 1
    if not np.isfinite(m).all():
        raise InputError(f"{what}: the matrix has non-finite entries")
    if not np.allclose(m[n], np.eye(n + 1)[n], atol=1e-9):
        raise InputError(f"{what}: the matrix's last row must be {np.eye(n + 1)[n].tolist()}, got {m[n].tolist()}")
    return m


def _fmt(values) -> str:
    return " ".join(repr(float(v)) for v in np.asarray(values, np.float64).ravel())


# -- plain text world matrix -------------------------------------------------------------------
def write_matrix_txt(path: PathLike, matrix) -> Path:
    """Write ``T`` (fixed world RAS -> moving world RAS, mm) as ``ndim + 1`` rows of numbers with a
    comment header, at full float64 precision, atomically."""
    m = _check_matrix(matrix, str(path))
    text = ("# regkit affine, world (RAS, mm) matrix: p_moving = M @ p_fixed (fixed world -> moving world)\n"
            + "".join(_fmt(row) + "\n" for row in m))
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_matrix_txt(path: PathLike) -> np.ndarray:
    """Read a matrix written by :func:`write_matrix_txt` (``#`` comments allowed)."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{p}: no such file")
    rows: List[List[float]] = []
    for line_no, line in enumerate(p.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            rows.append([float(v) for v in line.replace(",", " ").split()])
        except ValueError:
            raise InputError(f"{p}:{line_no}: not a row of numbers: {line[:60]!r}") from None
    if not rows or len({len(r) for r in rows}) != 1:
        raise InputError(f"{p}: expected 3 or 4 rows of as many numbers, got row lengths {[len(r) for r in rows]}")
    return _check_matrix(np.array(rows), str(p))


# -- ITK .tfm ------------------------------------------------------------------------------------
def write_itk_tfm(path: PathLike, matrix) -> Path:
    """Write the world matrix ``T`` (RAS, fixed -> moving) as an ITK ``AffineTransform_double_N_N``
    in PHYSICAL space (LPS, mm), fixed -> moving as ITK expects, centre 0; atomically."""
    m = _check_matrix(matrix, str(path))
    n = m.shape[0] - 1
    d = _ras_lps(n)
    itk = d @ m @ d
    text = (f"{ITK_HEADER}\n#Transform 0\nTransform: AffineTransform_double_{n}_{n}\n"
            f"Parameters: {_fmt(itk[:n, :n])} {_fmt(itk[:n, n])}\n"
            f"FixedParameters: {_fmt(np.zeros(n))}\n")
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _parse_tfm(p: Path) -> List[dict]:
    text = p.read_text(errors="replace")
    if not text.lstrip().startswith("#Insight Transform File"):
        raise InputError(f"{p}: not an ITK text transform file (first line should be '{ITK_HEADER}'); "
                         f"binary .mat files are not supported")
    blocks: List[dict] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        m = re.match(r"\s*(Transform|Parameters|FixedParameters)\s*:\s*(.*)$", line)
        if not m:
            continue
        key, value = m.group(1), m.group(2).strip()
        if key == "Transform":
            blocks.append({"type": value, "line": line_no})
        elif not blocks:
            raise InputError(f"{p}:{line_no}: '{key}' before any 'Transform:' line")
        else:
            try:
                blocks[-1][key] = np.array([float(v) for v in value.split()], dtype=np.float64)
            except ValueError:
                raise InputError(f"{p}:{line_no}: {key} must be numbers, got {value[:60]!r}") from None
    if not blocks:
        raise InputError(f"{p}: no 'Transform:' entry found")
    return blocks


def read_itk_tfm(path: PathLike, space: str = "physical") -> np.ndarray:
    """Read an ITK ``.tfm`` affine (or a composite of affines) as one homogeneous matrix.

    Args:
        path: the ``.tfm`` file.
        space: ``physical`` (ITK's usual meaning: LPS mm, fixed -> moving): returns regkit's world
            matrix in RAS, ``D @ T_itk @ D``; ``index``: the file maps voxel indices, and ITK's
            matrix is returned unchanged (fixed index -> moving index), see the module docstring.
    Returns:
        ``(ndim + 1, ndim + 1)`` float64.
    """
    check_choice("tfm space", space, SPACES)
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{p}: no such file")
    total = None
    for block in _parse_tfm(p):
        kind = block["type"]
        if kind.startswith("CompositeTransform"):
            continue
        m = re.match(r"(\w+?)_(double|float)_(\d)_(\d)$", kind)
        if not m or m.group(1) not in _AFFINE_TYPES or m.group(3) != m.group(4) or m.group(3) not in "23":
            raise InputError(f"{p}:{block['line']}: unsupported transform type '{kind}' (supported: "
                             f"{', '.join(t + '_double_N_N' for t in _AFFINE_TYPES)} with N = 2 or 3, and "
                             f"composites of them)")
        n = int(m.group(3))
        params, fixed = block.get("Parameters"), block.get("FixedParameters", np.zeros(n))
        if params is None or params.size != n * n + n or fixed.size != n:
            raise InputError(f"{p}:{block['line']}: {kind} needs {n * n + n} Parameters and {n} FixedParameters, "
                             f"got {0 if params is None else params.size} and {fixed.size}")
        lin, t = params[: n * n].reshape(n, n), params[n * n:]
        mat = np.eye(n + 1)
        mat[:n, :n] = lin
        mat[:n, n] = t + fixed - lin @ fixed          # x -> M (x - c) + c + t
        if total is not None and total.shape != mat.shape:
            raise InputError(f"{p}: the composite mixes 2-D and 3-D transforms")
        total = mat if total is None else total @ mat  # the first listed is applied last
    if total is None:
        raise InputError(f"{p}: the file holds no affine transform (an empty composite)")
    if space == "physical":
        d = _ras_lps(total.shape[0] - 1)
        total = d @ total @ d
    return total
