"""Datasets as train/val/test pair lists with their loaders (the ``dataset=`` config group)."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from regkit.data.io import load_volume, open_image
from regkit.data.pairs import NORMALIZATIONS, EpochSampler, Pair, PairDataset, read_pairs_csv
from regkit import distributed
from regkit.errors import InputError, check_choice
from regkit.metrics import resolve_groups, resolve_labels

log = logging.getLogger(__name__)
PairSource = Union[None, str, Path, Sequence[Pair]]
VALIDATE_LEVELS = ("none", "header", "full")
AFFINE_CHECKS = ("error", "warn", "off")


def _as_pairs(source: PairSource, root=None) -> List[Pair]:
    if source is None:
        return []
    if isinstance(source, (str, Path)):
        return read_pairs_csv(source, root)
    return list(source)


class PairData:
    """Train/val/test pairs of NIfTI files and their data loaders.

    Args:
        train, val, test: a pair-list CSV path or a list of :class:`Pair`.
        batch_size, num_workers: loader options (validation uses batch 1).
        normalize: intensity normalisation (``none``, ``minmax``, ``percentile``, ``zscore``);
            stored in checkpoints so that ``regkit-register`` normalises new scans the same way.
        cache: keep loaded volumes in memory.
        eval_labels: label values that validation Dice averages over: a list, a named set
            (``ixi``: the 30 IXI structures), or ``None`` for every nonzero label of the first
            validation fixed label map.
        label_groups: optional grouping of ``eval_labels`` reported as well, e.g. ``ixi`` (the
            17 left/right-averaged IXI structures) or ``{name: [labels]}``.
        shape: the size every file must have (``None``: any size, but equal within a pair).
        resize: resample every volume to this size after loading (train at a reduced size).
        affine_check: what to do when a label map's affine differs from its image's (beyond
            1e-3 mm): ``error`` (default), ``warn`` or ``off``. Moving and fixed images may
            have different affines (the network works in voxel space).
        validate: before training, check the files: ``header`` (exist, readable, shapes and
            affines agree within each pair) or ``full`` (also NaN/inf and integer label maps);
            ``none`` skips.
        seed: shuffling seed (combined with the epoch).
        root: folder that relative paths in the CSVs are relative to (default: each CSV's own
            folder).
        transform: ``transform(item, generator) -> item`` applied to each training sample (e.g.
            augmentation), with the sample's own generator (:class:`~regkit.data.pairs.PairDataset`).
    """

    def __init__(self, train: PairSource, val: PairSource = None, test: PairSource = None,
                 batch_size: int = 1, num_workers: int = 0, normalize: str = "minmax",
                 cache: bool = False, eval_labels: Union[None, str, Sequence[int]] = None,
                 label_groups: Union[None, str, Mapping[str, Sequence[int]]] = None,
                 shape: Optional[Sequence[int]] = None, resize: Optional[Sequence[int]] = None,
                 affine_check: str = "error", validate: str = "full", seed: int = 0, root=None,
                 transform: Optional[Callable] = None) -> None:
        check_choice("validate", validate, VALIDATE_LEVELS)
        check_choice("affine_check", affine_check, AFFINE_CHECKS)
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        check_choice("normalize", normalize, NORMALIZATIONS)
        for name, size in (("shape", shape), ("resize", resize)):
            if size is not None and (len(size) not in (2, 3) or any(int(s) < 2 for s in size)):
                raise InputError(f"{name} must be 2 or 3 sizes >= 2, got {list(size)}")
        self.sources = {"train": train, "val": val, "test": test}
        self.csv_root = root
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.normalize, self.cache, self.validate_level = normalize, bool(cache), validate
        self.shape = tuple(int(s) for s in shape) if shape is not None else None
        self.resize = tuple(int(s) for s in resize) if resize is not None else None
        self.affine_check = affine_check
        self.seed = int(seed)
        self.transform = transform
        self._eval_labels = list(resolve_labels(eval_labels)) if eval_labels is not None else None
        self.label_groups = resolve_groups(label_groups)
        self.pairs: dict = {}
        self.datasets: dict = {}
        self._loaders: Dict[str, Optional[DataLoader]] = {}
        self._is_setup = False

    # -- set-up ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create or find files (overridden by datasets that generate or scan them)."""

    def setup(self) -> "PairData":
        if self._is_setup:
            return self
        self.prepare()
        for split, source in self.sources.items():
            self.pairs[split] = _as_pairs(source, self.csv_root)
            if not self.pairs[split] and (split == "train" or source is not None):
                name = "training" if split == "train" else split
                raise InputError(f"the {name} split is empty (source: {source})")
        if self.validate_level != "none":
            self.check_files()
        for split, pairs in self.pairs.items():
            self.datasets[split] = PairDataset(pairs, normalize=self.normalize, cache=self.cache, resize=self.resize,
                                               transform=self.transform if split == "train" else None, seed=self.seed)
        self._is_setup = True
        return self

    def check_files(self) -> None:
        """Check every file once, before any training time is spent; report all problems."""
        full = self.validate_level == "full"
        headers, problems, warnings = {}, [], []
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
                    vol = load_volume(f, np.int64 if is_label else np.float32, label=is_label)
                    headers[f] = (vol.data.shape, vol.affine)
                else:
                    headers[f] = _header(f)
            except (InputError, FileNotFoundError) as exc:
                problems.append(str(exc))
                continue
            if self.shape is not None and tuple(headers[f][0]) != self.shape:
                problems.append(f"{f}: shape {tuple(headers[f][0])}, expected {self.shape} (dataset.shape)")
        for split, pairs in self.pairs.items():
            for pr in pairs:
                ref = headers.get(pr.moving)
                for f in pr.files()[1:]:
                    if ref is not None and f in headers and headers[f][0] != ref[0]:
                        problems.append(f"{split} pair '{pr.id}': {f} has shape {headers[f][0]} but moving {pr.moving} has {ref[0]}")
                if self.affine_check == "off":
                    continue
                for image, label in ((pr.moving, pr.moving_label), (pr.fixed, pr.fixed_label)):
                    if label is None or image not in headers or label not in headers:
                        continue
                    message = affine_mismatch(image, headers[image][1], label, headers[label][1])
                    if message:
                        (problems if self.affine_check == "error" else warnings).append(message)
        for message in dict.fromkeys(warnings):
            log.warning("%s", message)
        if problems:
            problems = list(dict.fromkeys(problems))
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise InputError(f"{len(problems)} problem(s) in the data: " + "; ".join(problems[:5]) + more)
        log.info("checked %d data files (%s)", len(files), self.validate_level)

    def spec(self) -> Dict[str, object]:
        """Plain data a checkpoint keeps so that inference prepares new scans as in training:
        the normalisation, the size the network saw, and the evaluated labels."""
        self.setup()
        shape = self.resize
        if shape is None:
            if getattr(self, "_shape_seen", None) is None:
                self._shape_seen = tuple(self.datasets["train"][0]["moving"].shape[1:])
            shape = self._shape_seen
        return {"normalize": self.normalize, "shape": list(shape), "resize": list(self.resize) if self.resize else None,
                "eval_labels": self._eval_labels, "label_groups": {k: list(v) for k, v in (self.label_groups or {}).items()},
                "intensity": self.intensity_range()}

    def intensity_range(self, max_items: int = 4) -> List[float]:
        """``[low, high]``: the 0.5th and 99.5th percentiles of the first training images after
        normalisation (what the network saw). A checkpoint keeps it, so that registration can tell
        scans in another range (e.g. uint8 0-255 for a network trained on [0, 1]) from good ones."""
        if getattr(self, "_intensity", None) is None:
            ds = self.setup().datasets["train"]
            values = []
            for k in range(min(max_items, len(ds))):
                item = ds.load(k) if hasattr(ds, "load") else ds[k]
                values += [item["moving"].flatten(), item["fixed"].flatten()]
            q = torch.quantile(torch.cat(values)[:: max(1, sum(v.numel() for v in values) // 2 ** 22)].double(),
                               torch.tensor([0.005, 0.995], dtype=torch.float64))
            self._intensity = [float(q[0]), float(q[1])]
        return list(self._intensity)

    # -- loaders --------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        """The training loader, built once (its workers persist across epochs): an
        :class:`~regkit.data.pairs.EpochSampler` shuffled with ``seed + epoch`` (the trainer
        sets the epoch); under torchrun each rank gets its shard of the same permutation
        (:func:`train_sampler`) and ``batch_size`` is per process.

        The loader has its own generator, so that starting its workers draws nothing from the
        global torch RNG (a resumed run would otherwise draw at another point and diverge).
        """
        if self._loaders.get("train") is None:
            ds = self.setup().datasets["train"]
            sampler = train_sampler(len(ds), self.seed) or EpochSampler(len(ds), True, self.seed)
            self._loaders["train"] = DataLoader(
                ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                drop_last=len(sampler) >= self.batch_size, persistent_workers=self.num_workers > 0,
                generator=torch.Generator().manual_seed(self.seed), worker_init_fn=seed_worker)
        return self._loaders["train"]

    def _eval_loader(self, split: str) -> Optional[DataLoader]:
        if split not in self._loaders:
            ds = self.setup().datasets.get(split)
            self._loaders[split] = None if ds is None or len(ds) == 0 else DataLoader(
                ds, batch_size=1, shuffle=False, num_workers=self.num_workers,
                generator=torch.Generator().manual_seed(self.seed), worker_init_fn=seed_worker)
        return self._loaders[split]

    def val_dataloader(self) -> Optional[DataLoader]:
        return self._eval_loader("val")

    def test_dataloader(self) -> Optional[DataLoader]:
        return self._eval_loader("test")

    def dataloader(self, split: str) -> Optional[DataLoader]:
        """The loader of ``split`` (``train`` shuffled, ``val``/``test`` in order, batch 1)."""
        check_choice("split", split, self.sources)
        return self.train_dataloader() if split == "train" else self._eval_loader(split)

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



def train_sampler(dataset_len: int, seed: int):
    """regkit's :class:`~regkit.data.pairs.EpochSampler` for this rank, or ``None`` for a single
    process.

    Shuffles ``range(n)`` with ``seed + epoch`` (the trainer calls ``set_epoch``), the same
    permutation a single process uses, drops its tail so that every rank gets ``n // W``
    samples, and gives rank ``r`` the elements ``r, r + W, ...`` (torch's ``DistributedSampler``
    sharding). With a per-rank batch ``b``, global step ``k`` therefore sees permutation entries
    ``k W b .. (k + 1) W b - 1``: exactly the samples of a single process with batch ``W b``.
    """
    if not distributed.is_distributed():
        return None
    w = distributed.world_size()
    if dataset_len < w:
        raise InputError(f"the training split has {dataset_len} pairs, fewer than the {w} processes; "
                         f"use fewer processes or more data")
    return EpochSampler(dataset_len, shuffle=True, seed=seed, num_replicas=w, rank=distributed.rank())


def seed_worker(worker_id: int) -> None:
    """Seed NumPy and Python in a loader worker from torch's per-worker seed (torch seeds only
    itself and ``random``; forked workers would otherwise share one NumPy state). The data
    pipeline's own randomness comes from per-sample generators, not from these."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def _header(path: Path):
    """``(shape, affine)`` from the header only (no voxel data read)."""
    img = open_image(path)
    shape = img.shape
    shape = tuple(shape[:3]) if len(shape) == 4 and shape[3] == 1 else tuple(shape)
    return shape, np.asarray(img.affine, dtype=np.float64)


def affine_mismatch(image: Path, image_affine: np.ndarray, label: Path, label_affine: np.ndarray,
                    tol: float = 1e-3) -> Optional[str]:
    """One line naming both files and how their voxel-to-world affines differ, or ``None``."""
    if np.allclose(image_affine, label_affine, atol=tol, rtol=0):
        return None
    def describe(a):
        spacing = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
        return f"spacing {np.round(spacing, 4).tolist()} mm, origin {np.round(a[:3, 3], 3).tolist()}"
    worst = float(np.abs(image_affine - label_affine).max())
    return (f"label map {label} and image {image} have different affines (max difference {worst:.4g}; "
            f"label: {describe(label_affine)}; image: {describe(image_affine)}): the label map's header "
            f"is wrong or it belongs to another image (dataset.affine_check=warn to proceed anyway)")
