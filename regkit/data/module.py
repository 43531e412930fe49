"""Datasets as train/val/test pair lists with their loaders (the ``dataset=`` config group)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from regkit.data.io import load_volume
from regkit.data.pairs import EpochSampler, Pair, PairDataset, read_pairs_csv
from regkit.distributed import train_sampler
from regkit.errors import InputError

log = logging.getLogger(__name__)
PairSource = Union[None, str, Path, Sequence[Pair]]
VALIDATE_LEVELS = ("none", "header", "full")


def _as_pairs(source: PairSource) -> List[Pair]:
    if source is None:
        return []
    if isinstance(source, (str, Path)):
        return read_pairs_csv(source)
    return list(source)


class PairData:
    """Train/val/test pairs of NIfTI files and their data loaders.

    Args:
        train, val, test: a pair-list CSV path or a list of :class:`Pair`.
        batch_size, num_workers: loader options (validation uses batch 1).
        normalize: intensity normalisation (``none``, ``minmax``, ``percentile``, ``zscore``).
        cache: keep loaded volumes in memory.
        eval_labels: label values that validation Dice averages over; ``None`` means every
            nonzero label of the first validation fixed label map.
        validate: before training, check the files: ``header`` (exist, readable, shapes agree
            within each pair) or ``full`` (also NaN/inf and integer label maps); ``none`` skips.
        seed: shuffling seed (combined with the epoch).
    """

    def __init__(self, train: PairSource, val: PairSource = None, test: PairSource = None,
                 batch_size: int = 1, num_workers: int = 0, normalize: str = "minmax",
                 cache: bool = False, eval_labels: Optional[Sequence[int]] = None,
                 validate: str = "full", seed: int = 0) -> None:
        if validate not in VALIDATE_LEVELS:
            raise InputError(f"Unknown validate '{validate}'. Valid: {', '.join(VALIDATE_LEVELS)}.")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.sources = {"train": train, "val": val, "test": test}
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.normalize, self.cache, self.validate_level = normalize, bool(cache), validate
        self.seed = int(seed)
        self._eval_labels = list(eval_labels) if eval_labels is not None else None
        self.pairs: dict = {}
        self.datasets: dict = {}
        self._is_setup = False

    # -- set-up ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create files if this dataset generates them (overridden by the synthetic dataset)."""

    def setup(self) -> "PairData":
        if self._is_setup:
            return self
        self.prepare()
        for split, source in self.sources.items():
            self.pairs[split] = _as_pairs(source)
        if not self.pairs["train"]:
            raise InputError(f"the training split is empty (source: {self.sources['train']})")
        if self.validate_level != "none":
            self.check_files()
        for split, pairs in self.pairs.items():
            self.datasets[split] = PairDataset(pairs, normalize=self.normalize, cache=self.cache)
        self._is_setup = True
        return self

    def check_files(self) -> None:
        """Check every file once, before any training time is spent; report all problems."""
        full = self.validate_level == "full"
        shapes, problems = {}, []
        files = {}
        for pairs in self.pairs.values():
            for pr in pairs:
                for f in (pr.moving, pr.fixed):
                    files.setdefault(f, False)
                for f in (pr.moving_label, pr.fixed_label):
                    if f is not None:
                        files[f] = True
        for f, is_label in tqdm(files.items(), desc="checking data files", unit="file", leave=False,
                                disable=len(files) < 50):
            try:
                if full:
                    shapes[f] = load_volume(f, np.int64 if is_label else np.float32, label=is_label).data.shape
                else:
                    shapes[f] = _header_shape(f)
            except (InputError, FileNotFoundError) as exc:
                problems.append(str(exc))
        for split, pairs in self.pairs.items():
            for pr in pairs:
                ref = shapes.get(pr.moving)
                for f in pr.files()[1:]:
                    if ref is not None and f in shapes and shapes[f] != ref:
                        problems.append(f"{split} pair '{pr.id}': {f} has shape {shapes[f]} but moving {pr.moving} has {ref}")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise InputError(f"{len(problems)} problem(s) in the data: " + "; ".join(problems[:5]) + more)
        log.info("checked %d data files (%s)", len(files), self.validate_level)

    # -- loaders --------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        """Shuffled with ``seed + epoch``. Under torchrun each rank gets its shard of the same
        permutation (:func:`regkit.distributed.train_sampler`) and ``batch_size`` is per process."""
        ds = self.setup().datasets["train"]
        sampler = train_sampler(len(ds), self.seed) or EpochSampler(len(ds), True, self.seed)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          drop_last=len(sampler) >= self.batch_size, persistent_workers=self.num_workers > 0)

    def _eval_loader(self, split: str) -> Optional[DataLoader]:
        ds = self.setup().datasets.get(split)
        if ds is None or len(ds) == 0:
            return None
        return DataLoader(ds, batch_size=1, shuffle=False, num_workers=self.num_workers)

    def val_dataloader(self) -> Optional[DataLoader]:
        return self._eval_loader("val")

    def test_dataloader(self) -> Optional[DataLoader]:
        return self._eval_loader("test")

    @property
    def eval_labels(self) -> Optional[List[int]]:
        """Label values evaluated by Dice (see ``eval_labels`` above); None without labels."""
        if self._eval_labels is None:
            self.setup()
            for split in ("val", "test", "train"):
                pairs = [p for p in self.pairs.get(split, []) if p.has_labels]
                if pairs:
                    lab = load_volume(pairs[0].fixed_label, np.int64, label=True).data
                    self._eval_labels = [int(v) for v in np.unique(lab) if v != 0]
                    break
        return self._eval_labels


def _header_shape(path: Path):
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file")
    import nibabel

    try:
        shape = nibabel.load(str(path)).shape
    except Exception as exc:
        raise InputError(f"{path}: cannot read as a NIfTI/MGH image ({type(exc).__name__}: {exc})") from None
    return tuple(shape[:3]) if len(shape) == 4 and shape[3] == 1 else tuple(shape)
