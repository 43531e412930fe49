"""Image pairs from NIfTI files: the one loader every dataset (synthetic, IXI, CSV) goes through.

A pair list is a CSV with a header row and the columns ``moving,fixed`` and optionally
``moving_label,fixed_label`` (and ``id``). Relative paths are relative to the CSV's folder.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from regkit.data.io import PathLike, load_volume
from regkit.data.resample import resize_volume, resized_spacing
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
    if p.is_dir():
        raise InputError(f"{p}: is a folder; expected a pair-list CSV file (columns moving,fixed[,moving_label,fixed_label])")
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

    ``transform(item, generator) -> item`` (e.g. augmentation) is applied to training samples,
    whose keys carry the epoch; it must draw its randomness from ``generator`` alone (see
    :func:`sample_generator`), which ``seed`` seeds together with the epoch and the index.
    """

    def __init__(self, pairs: Sequence[Pair], normalize: str = "minmax", cache: bool = False,
                 resize: Optional[Sequence[int]] = None, transform: Optional[Callable] = None, seed: int = 0) -> None:
        check_choice("normalize", normalize, NORMALIZATIONS)
        self.pairs = list(pairs)
        self.normalize = normalize
        self.cache = cache
        self.resize = tuple(int(s) for s in resize) if resize else None
        self._cache: Dict[Path, tuple] = {}
        self.transform, self.seed = transform, int(seed)

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

    def __getitem__(self, key: Union[int, SampleKey]) -> dict:
        """The pair at ``key``: an index, or an ``(epoch, index)`` key from :class:`EpochSampler`,
        for which ``transform(item, generator)`` (if any) gets that sample's generator
        (:func:`sample_generator`); evaluation loaders pass plain indices and get no transform."""
        epoch, index = key if isinstance(key, tuple) else (None, key)
        item = self.load(index)
        if self.transform is not None and epoch is not None:
            item = self.transform(item, sample_generator(self.seed, epoch, index))
        return item

    def load(self, index: int) -> dict:
        """The pair at ``index`` as stored (normalised, resized), without any transform."""
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


SampleKey = Tuple[int, int]  # (epoch, index): what the training sampler yields


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The random stream of one training sample: a CPU generator seeded from ``(seed, epoch,
    index)`` through NumPy's ``SeedSequence`` (well-mixed, so nearby keys give unrelated streams).

    Randomness in the data pipeline (augmentation, synthesis) draws from it, never from a global
    RNG: then a sample's randomness does not depend on which worker loads it, on how many samples
    that worker loaded before, or on a resume in between, so training resumes exactly.
    """
    state = np.random.SeedSequence([int(seed) % 2 ** 63, int(epoch), int(index)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


class EpochSampler(Sampler):
    """The training order: a permutation of ``range(n)`` drawn with ``seed + epoch``, so that an
    epoch's order is the same after a resume, yielding ``(epoch, index)`` keys
    (:class:`PairDataset` derives each sample's random stream from them).

    With ``num_replicas = W > 1`` (torchrun) the permutation's tail is dropped so that every
    rank gets ``n // W`` samples, and rank ``r`` gets the entries ``r, r + W, ...``: the same
    sharding as torch's ``DistributedSampler``, so global step k holds the single process's
    batch k. :meth:`set_start` skips the first samples of the next epoch (resuming inside it).
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise InputError(f"sampler: rank {rank} of {num_replicas} replicas")
        self.n, self.shuffle, self.seed = int(n), bool(shuffle), int(seed)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's share of the current epoch."""
        if start < 0:
            raise InputError(f"sampler start must be >= 0, got {start}")
        self.start = int(start)

    def order(self) -> List[int]:
        """This rank's indices for the current epoch, before :meth:`set_start` skips any."""
        if self.shuffle:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            perm = list(range(self.n))
        if self.num_replicas > 1:
            perm = perm[: (self.n // self.num_replicas) * self.num_replicas][self.rank::self.num_replicas]
        return perm

    def __iter__(self) -> Iterator[SampleKey]:
        keys = [(self.epoch, i) for i in self.order()[self.start:]]
        return iter(keys)

    def __len__(self) -> int:
        return self.n // self.num_replicas if self.num_replicas > 1 else self.n
