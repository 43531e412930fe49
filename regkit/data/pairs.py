"""Image pairs from NIfTI files: the one loader every dataset (synthetic, IXI, CSV) goes through.

A pair list is a CSV with a header row and the columns ``moving,fixed`` and optionally
``moving_label,fixed_label`` (and ``id``). Relative paths are relative to the CSV's folder.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from regkit.data.io import PathLike, load_volume
from regkit.errors import InputError, MissingFileError, check_choice

NORMALIZATIONS = ("none", "minmax", "percentile", "zscore")


@dataclass(frozen=True)
class Pair:
    moving: Path
    fixed: Path
    moving_label: Optional[Path] = None
    fixed_label: Optional[Path] = None
    id: str = ""

    @property
    def has_labels(self) -> bool:
        return self.moving_label is not None and self.fixed_label is not None

    def files(self) -> List[Path]:
        return [p for p in (self.moving, self.fixed, self.moving_label, self.fixed_label) if p is not None]


def read_pairs_csv(path: PathLike, root: Optional[PathLike] = None) -> List[Pair]:
    """Parse a pair list; missing columns or rows are reported with the file and line.

    Relative paths are relative to ``root`` when given, else to the CSV's folder.
    """
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{p}: pair list not found")
    with open(p, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        for need in ("moving", "fixed"):
            if need not in cols:
                raise InputError(f"{p}: missing column '{need}' (found columns: {', '.join(cols) or 'none'})")
        base = Path(root).expanduser() if root is not None else p.parent
        pairs = []
        for line, row in enumerate(reader, start=2):
            def path_of(key: str) -> Optional[Path]:
                value = (row.get(key) or "").strip()
                if not value:
                    return None
                q = Path(value).expanduser()
                return q if q.is_absolute() else base / q

            moving, fixed = path_of("moving"), path_of("fixed")
            if moving is None or fixed is None:
                raise InputError(f"{p}:{line}: empty 'moving' or 'fixed' path")
            pair_id = (row.get("id") or "").strip() or f"{moving.name.split('.')[0]}->{fixed.name.split('.')[0]}"
            pairs.append(Pair(moving, fixed, path_of("moving_label"), path_of("fixed_label"), pair_id))
    return pairs


def write_pairs_csv(path: PathLike, pairs: Sequence[Pair], relative_to: Optional[PathLike] = None) -> None:
    base = Path(relative_to) if relative_to is not None else Path(path).parent

    def rel(q: Optional[Path]) -> str:
        if q is None:
            return ""
        try:
            return str(Path(q).relative_to(base))
        except ValueError:
            return str(q)

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "moving", "fixed", "moving_label", "fixed_label"])
        for pr in pairs:
            w.writerow([pr.id, rel(pr.moving), rel(pr.fixed), rel(pr.moving_label), rel(pr.fixed_label)])


def normalize_intensity(x: np.ndarray, method: str) -> np.ndarray:
    """Intensity normalisation: ``none``, ``minmax`` (to [0, 1]), ``percentile`` (clip to the
    0.5-99.5 percentiles, then to [0, 1]) or ``zscore`` (over nonzero voxels)."""
    check_choice("normalize", method, NORMALIZATIONS)
    if method == "none":
        return x
    if method == "minmax":
        lo, hi = float(x.min()), float(x.max())
    elif method == "percentile":
        lo, hi = np.percentile(x, [0.5, 99.5])
        x = np.clip(x, lo, hi)
    else:  # zscore
        fg = x[x != 0] if np.any(x != 0) else x
        mean, std = float(fg.mean()), float(fg.std())
        return (x - mean) / (std if std > 0 else 1.0)
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


class PairDataset(Dataset):
    """Loads pairs as ``{"moving", "fixed"[, "moving_label", "fixed_label"], "spacing", "id"}``.

    Images are ``(1, *spatial)`` float32, label maps ``(1, *spatial)`` int64, ``spacing`` the
    fixed image's voxel size in mm ``(ndim,)`` float64 (after any resizing). With ``cache=True``
    each file is read once and kept in memory (an atlas shared by every pair is read once), so
    data loading stays a small share of a step. With ``resize`` every volume is resampled to
    that size (images linearly, label maps by nearest neighbour; see
    :func:`regkit.data.resample.resize_volume`), e.g. to train at half the IXI size.
    """

    def __init__(self, pairs: Sequence[Pair], normalize: str = "minmax", cache: bool = False,
                 resize: Optional[Sequence[int]] = None) -> None:
        check_choice("normalize", normalize, NORMALIZATIONS)
        self.pairs = list(pairs)
        self.normalize = normalize
        self.cache = cache
        self.resize = tuple(int(s) for s in resize) if resize else None
        self._cache: Dict[Path, tuple] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, path: Path, label: bool) -> tuple:
        if path in self._cache:
            return self._cache[path]
        vol = load_volume(path, np.int64 if label else np.float32, label=label)
        arr, spacing = vol.data, vol.spacing
        if not label:
            arr = normalize_intensity(arr, self.normalize).astype(np.float32)
        if self.resize is not None and tuple(arr.shape) != self.resize:
            from regkit.data.resample import resize_volume, resized_spacing

            spacing = resized_spacing(spacing, arr.shape, self.resize)
            t = resize_volume(torch.from_numpy(np.ascontiguousarray(arr))[None, None], self.resize,
                              "nearest" if label else "bilinear")
            arr = t[0, 0].numpy()
        if label:  # cached compactly; items are int64
            small = arr.size == 0 or (arr.min() >= np.iinfo(np.int16).min and arr.max() <= np.iinfo(np.int16).max)
            arr = arr.astype(np.int16 if small else np.int32)
        out = (arr, spacing)
        if self.cache:
            self._cache[path] = out
        return out

    def _image(self, path: Path) -> np.ndarray:
        return self._load(path, False)[0]

    def _label(self, path: Path) -> np.ndarray:
        return self._load(path, True)[0]

    def __getitem__(self, index: int) -> dict:
        pr = self.pairs[index]
        moving = self._image(pr.moving)
        fixed, spacing = self._load(pr.fixed, False)
        if moving.shape != fixed.shape:
            raise InputError(f"pair '{pr.id}': moving {pr.moving} has shape {moving.shape} but fixed {pr.fixed} has {fixed.shape}")
        item = {"moving": torch.from_numpy(moving[None].copy()), "fixed": torch.from_numpy(fixed[None].copy()),
                "spacing": torch.tensor(spacing, dtype=torch.float64), "id": pr.id}
        if pr.has_labels:
            ml, fl = self._label(pr.moving_label), self._label(pr.fixed_label)
            for what, lab in (("moving_label", pr.moving_label), ("fixed_label", pr.fixed_label)):
                shape = ml.shape if what == "moving_label" else fl.shape
                if shape != moving.shape:
                    raise InputError(f"pair '{pr.id}': label map {lab} has shape {shape}, image has {moving.shape}")
            item["moving_label"] = torch.from_numpy(ml[None].astype(np.int64))
            item["fixed_label"] = torch.from_numpy(fl[None].astype(np.int64))
        return item


class EpochSampler(Sampler):
    """Shuffles with ``seed + epoch`` so that an epoch's order is the same after a resume."""

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
