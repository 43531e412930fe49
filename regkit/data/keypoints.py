"""Keypoint files (Learn2Reg CSVs) and a dataset that adds them to each pair's batch item.

A Learn2Reg keypoint or landmark file is a CSV without header, one point per line, ``ndim``
comma-separated voxel coordinates along the image's array axes (e.g. ``21.000,88.000,73.000``);
line ``i`` of the fixed file corresponds to line ``i`` of the moving file. The dataset JSON
lists the file of each image under ``"keypoints"``; the challenge's evaluation finds it from the
image path instead (``imagesTr/X.nii.gz`` -> ``keypointsTr/X.csv``), see :func:`companion_path`.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from regkit.data.io import PathLike
from regkit.data.module import _header
from regkit.data.pairs import PairDataset
from regkit.data.resample import resized_spacing
from regkit.errors import InputError, MissingFileError
from regkit.metrics import keypoint_metrics

KeypointFiles = Tuple[Path, Path]  # (fixed CSV, moving CSV)


def companion_path(image: str, folder: str, suffix: str = ".csv") -> str:
    """The Learn2Reg evaluation's path rule: ``images`` -> ``folder`` and ``.nii.gz`` -> ``suffix``
    in an image path of the dataset JSON, e.g. ``./imagesTr/NLST_0001_0000.nii.gz`` ->
    ``./keypointsTr/NLST_0001_0000.csv`` (``folder="keypoints"``) or ``./labelsTr/...nii.gz``
    (``folder="labels", suffix=".nii.gz"``)."""
    return image.replace("images", folder).replace(".nii.gz", suffix)


def batch_keypoint_metrics(flow: torch.Tensor, batch: dict) -> Dict[str, torch.Tensor]:
    """``keypoint_metrics`` (``tre``, ``tre_initial``: ``(B,)`` mm, float64) of a batch built by
    :class:`KeypointPairDataset`, with its mask and the moving spacing; ``{}`` when the batch has
    no keypoints. What validation and ``regkit-evaluate`` report as TRE."""
    if batch.get("fixed_keypoints") is None or batch.get("moving_keypoints") is None:
        return {}
    return keypoint_metrics(flow, batch["fixed_keypoints"], batch["moving_keypoints"],
                            batch.get("moving_spacing", batch.get("spacing")), batch.get("keypoints_mask"))


def read_keypoints(path: PathLike, ndim: int = 3) -> np.ndarray:
    """Read a keypoint CSV into a float64 ``(N, ndim)`` array of voxel coordinates.

    Errors name the file and line: missing file, a line that is not ``ndim`` numbers, NaN/inf,
    or no point at all.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{p}: keypoint file not found")
    rows: List[List[float]] = []
    with open(p, newline="") as fh:
        for line, row in enumerate(csv.reader(fh), start=1):
            if not row or all(not v.strip() for v in row):
                continue
            try:
                values = [float(v) for v in row]
            except ValueError:
                raise InputError(f"{p}:{line}: expected {ndim} comma-separated voxel coordinates, got {','.join(row)!r}") from None
            if len(values) != ndim:
                raise InputError(f"{p}:{line}: expected {ndim} coordinates, got {len(values)}")
            if not all(math.isfinite(v) for v in values):
                raise InputError(f"{p}:{line}: non-finite coordinate in {','.join(row)!r}")
            rows.append(values)
    if not rows:
        raise InputError(f"{p}: no keypoints in the file")
    return np.asarray(rows, dtype=np.float64)


def read_keypoint_pair(fixed: PathLike, moving: PathLike, ndim: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    """Both files of a pair; they must hold the same number of points (row i corresponds)."""
    f, m = read_keypoints(fixed, ndim), read_keypoints(moving, ndim)
    if len(f) != len(m):
        raise InputError(f"keypoint files differ in length: fixed {fixed} has {len(f)} points, moving {moving} has "
                         f"{len(m)} (row i of one must correspond to row i of the other)")
    return f, m


class KeypointPairDataset(Dataset):
    """A :class:`~regkit.data.pairs.PairDataset` whose items also carry the pair's keypoints.

    Adds to each item:

    * ``fixed_keypoints``, ``moving_keypoints``: ``(N_max, ndim)`` float64 voxel coordinates on
      the grid the item's images have (scaled like the images when the dataset resizes them);
    * ``keypoints_mask``: ``(N_max,)`` bool, True for the pair's own points. Pairs have
      different numbers of keypoints, so every item is padded (with zeros, masked out) to the
      largest count of the split and the default collate function stacks them into
      ``(B, N_max, ndim)``;
    * ``moving_spacing``: ``(ndim,)`` float64, the moving image's voxel size in mm (the TRE
      unit the challenge uses; ``spacing`` is the fixed image's).

    A pair without keypoint files (``None``) gets an all-False mask. Every file is read and
    checked here, before any training time is spent.

    Args:
        base: the pair dataset (its ``pairs`` and ``resize`` are used).
        files: one ``(fixed CSV, moving CSV)`` or ``None`` per pair of ``base``.
    """

    def __init__(self, base: PairDataset, files: Sequence[Optional[KeypointFiles]]) -> None:
        if len(files) != len(base):
            raise InputError(f"{len(files)} keypoint entries for {len(base)} pairs")
        if getattr(base.transform, "spatial", False) and any(f is not None for f in files):
            # the transform moves the images' voxels but not these points: they would no longer correspond
            raise InputError(f"spatial augmentation ({base.transform!r}) cannot be used on pairs with keypoints: "
                             f"the keypoints would not move with the images; use an intensity-only augmentation "
                             f"(rotate, scale, shear, translate, elastic = 0, no flip_axes) or augment=none")
        self.base = base
        self.pairs = base.pairs
        self.files = list(files)
        self.points: List[Optional[Tuple[np.ndarray, np.ndarray]]] = []
        self._headers: Dict[Path, tuple] = {}
        for pr, kp in zip(self.pairs, self.files):
            if kp is None:
                self.points.append(None)
                continue
            fixed, moving = read_keypoint_pair(kp[0], kp[1])
            if base.resize is not None:  # the voxel grid shrinks or grows with align-corners resizing
                fixed = fixed * self._scale(pr.fixed)
                moving = moving * self._scale(pr.moving)
            self.points.append((fixed, moving))
        self.n_max = max([len(p[0]) for p in self.points if p is not None] or [0])

    def _header(self, path: Path) -> tuple:
        if path not in self._headers:
            self._headers[path] = _header(path)
        return self._headers[path]

    def _scale(self, image: Path) -> np.ndarray:
        shape = self._header(image)[0]
        return np.array([(n - 1) / max(o - 1, 1) for o, n in zip(shape, self.base.resize)])

    def _spacing(self, image: Path) -> Tuple[float, ...]:
        shape, affine = self._header(image)
        spacing = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        return resized_spacing(spacing, shape, self.base.resize) if self.base.resize is not None else spacing

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key) -> dict:
        """``key``: an index, or the training sampler's ``(epoch, index)`` (see :class:`PairDataset`)."""
        item = self.base[key]
        index = key[1] if isinstance(key, tuple) else key
        ndim = item["moving"].dim() - 1
        fixed = torch.zeros(self.n_max, ndim, dtype=torch.float64)
        moving = torch.zeros(self.n_max, ndim, dtype=torch.float64)
        mask = torch.zeros(self.n_max, dtype=torch.bool)
        points = self.points[index]
        if points is not None:
            n = len(points[0])
            fixed[:n], moving[:n], mask[:n] = torch.from_numpy(points[0]), torch.from_numpy(points[1]), True
        item.update(fixed_keypoints=fixed, moving_keypoints=moving, keypoints_mask=mask,
                    moving_spacing=torch.tensor(self._spacing(self.pairs[index].moving), dtype=torch.float64))
        return item
