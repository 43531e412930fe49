"""Real-data datasets, each a :class:`~regkit.data.PairData` whose pair lists come from a folder
layout or a dataset file (one loader for all): ``dataset=ixi`` and ``dataset=learn2reg``.
``dataset=pairs`` is :class:`PairData` itself, reading pair-list CSVs.
"""
from __future__ import annotations

import itertools
import json
import logging
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from regkit.data.io import VOLUME_SUFFIXES
from regkit.data.keypoints import KeypointPairDataset, companion_path
from regkit.data.module import PairData
from regkit.data.pairs import Pair
from regkit.errors import InputError, MissingFileError, check_choice

log = logging.getLogger(__name__)

IXI_SHAPE = (160, 192, 224)
DIRECTIONS = ("atlas_to_subject", "subject_to_atlas")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _volumes(folder: Path) -> Dict[str, Path]:
    """``{id: path}`` for the volumes in ``folder`` (``.nii``, ``.nii.gz``, ``.mgz``, ``.mgh``)."""
    out: Dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.endswith(VOLUME_SUFFIXES) and not p.name.startswith("."):
            out[_stem(p)] = p
    return out


class IXIData(PairData):
    """``dataset=ixi``: the IXI atlas-to-subject protocol from a folder of NIfTI files.

    Layout (what ``scripts/convert_ixi_pkl.py`` writes)::

        <root>/atlas.nii.gz            atlas image      (moving)
        <root>/atlas_label.nii.gz      atlas label map
        <root>/<split>/images/<id>.nii.gz   subject images (fixed), split = train, val, test
        <root>/<split>/labels/<id>.nii.gz   their label maps, same <id>

    A split folder that is absent is skipped (no validation without ``val``); a split folder
    that is present but holds no image is an error, and so is an image without its label map
    when the split has a ``labels/`` folder.

    Args:
        root: the dataset folder.
        atlas, atlas_label: file names (or paths) of the atlas image and label map; ``atlas_label``
            may be ``null``.
        direction: ``atlas_to_subject`` (atlas moving, subject fixed: the published protocol) or
            ``subject_to_atlas``.
        shape: the size every file must have (IXI: 160×192×224; ``null`` for any).
        **kwargs: :class:`PairData` options. Defaults: the 30 IXI labels, their 17-structure
            grouping, no intensity normalisation (the release is already in [0, 1]).
    """

    def __init__(self, root, atlas: str = "atlas.nii.gz", atlas_label: Optional[str] = "atlas_label.nii.gz",
                 direction: str = "atlas_to_subject", shape: Optional[Sequence[int]] = IXI_SHAPE,
                 splits: Sequence[str] = ("train", "val", "test"), **kwargs) -> None:
        check_choice("direction", direction, DIRECTIONS)
        kwargs.setdefault("eval_labels", "ixi")
        kwargs.setdefault("label_groups", "ixi")
        kwargs.setdefault("normalize", "none")
        super().__init__(train=None, shape=shape, **kwargs)
        self.root = Path(root).expanduser()
        self.atlas = self.root / atlas
        self.atlas_label = self.root / atlas_label if atlas_label else None
        self.direction = direction
        self.splits = tuple(splits)

    def prepare(self) -> None:
        if not self.root.is_dir():
            raise MissingFileError(f"{self.root}: IXI dataset folder not found (see data/README.md for the layout)")
        if not self.atlas.exists():
            raise MissingFileError(f"{self.atlas}: atlas image not found")
        sources: Dict[str, Optional[List[Pair]]] = {"train": [], "val": None, "test": None}
        for split in self.splits:
            folder = self.root / split
            if not folder.is_dir():
                if split == "train":
                    raise MissingFileError(f"{folder}: training folder not found (expected {split}/images/<id>.nii.gz)")
                log.warning("IXI: no %s folder at %s; the %s split is skipped", split, folder, split)
                continue
            images_dir = folder / "images"
            if not images_dir.is_dir():
                raise MissingFileError(f"{images_dir}: not found (expected {split}/images/<id>.nii.gz)")
            images = _volumes(images_dir)
            if not images:
                raise InputError(f"the {split} split is empty: no .nii/.nii.gz/.mgz file in {images_dir}")
            labels_dir = folder / "labels"
            labels = _volumes(labels_dir) if labels_dir.is_dir() else None
            if labels is not None:
                missing = sorted(set(images) - set(labels))
                if missing:
                    raise MissingFileError(f"{labels_dir}: no label map for {len(missing)} image(s), e.g. "
                                           f"{', '.join(missing[:3])} (expected {labels_dir}/<id>.nii.gz)")
            pairs = []
            for sid, image in images.items():
                label = labels[sid] if labels is not None else None
                atlas_label = self.atlas_label if label is not None else None
                if self.direction == "atlas_to_subject":
                    pairs.append(Pair(self.atlas, image, atlas_label, label, id=f"atlas->{sid}"))
                else:
                    pairs.append(Pair(image, self.atlas, label, atlas_label, id=f"{sid}->atlas"))
            sources[split] = pairs
        self.sources = sources


TRAIN_PAIRINGS = ("auto", "paired", "all", "random")


class Learn2RegData(PairData):
    """``dataset=learn2reg``: a Learn2Reg-style dataset JSON (e.g. ``OASIS_dataset.json``).

    The JSON lists images (``training``: ``{"image", "label"?}`` entries, paths relative to the
    JSON's folder), optional training pairs (``training_paired_images``: ``{"fixed", "moving"}``)
    and the evaluation pairs (``registration_val``, ``registration_test``). Label maps are
    looked up from the image entries, and so are keypoint CSVs (``"keypoints"``; else the
    challenge's ``keypointsTr/<image>.csv`` beside ``imagesTr`` when it exists): pairs with
    keypoints get ``fixed_keypoints``, ``moving_keypoints``, ``keypoints_mask`` and
    ``moving_spacing`` in their batch items (:class:`~regkit.data.keypoints.KeypointPairDataset`).

    Args:
        json: path of the dataset JSON.
        train_pairing: ``paired`` (the JSON's training pairs), ``all`` (every ordered pair of
            distinct training images: n·(n−1)), ``random`` (``pairs_per_image`` seeded partners
            per moving image), or ``auto`` (``paired`` when the JSON has training pairs, else
            ``random``). Images that appear in the validation pairs are left out of unpaired
            training, so validation measures unseen subjects.
        pairs_per_image: partners per image for ``random``.
        keypoints: add the pairs' keypoints to the batch (for TRE and the ``keypoints`` loss).
        **kwargs: :class:`PairData` options.
    """

    def __init__(self, json, train_pairing: str = "auto", pairs_per_image: int = 4, keypoints: bool = True,
                 **kwargs) -> None:
        check_choice("train_pairing", train_pairing, TRAIN_PAIRINGS)
        if pairs_per_image < 1:
            raise InputError(f"pairs_per_image must be >= 1, got {pairs_per_image}")
        super().__init__(train=None, **kwargs)
        self.json_path = Path(json).expanduser()
        self.train_pairing, self.pairs_per_image = train_pairing, int(pairs_per_image)
        self.keypoints = bool(keypoints)
        self.keypoint_files: Dict[tuple, tuple] = {}  # (moving, fixed) image -> (fixed CSV, moving CSV)

    def _read(self) -> dict:
        if not self.json_path.exists():
            raise MissingFileError(f"{self.json_path}: dataset JSON not found")
        try:
            data = json.loads(self.json_path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.json_path}: not a readable JSON file ({exc})") from None
        if not isinstance(data, dict):
            raise InputError(f"{self.json_path}: expected a JSON object with 'training' and 'registration_val' lists")
        return data

    def prepare(self) -> None:
        data = self._read()
        base = self.json_path.parent

        def path(rel: str) -> Path:
            p = Path(rel)
            return p if p.is_absolute() else base / p

        labels: Dict[str, Optional[str]] = {}
        keypoints: Dict[str, str] = {}
        for key in ("training", "test"):
            for entry in data.get(key) or []:
                if isinstance(entry, dict) and "image" in entry:
                    labels[entry["image"]] = entry.get("label")
                    if entry.get("keypoints"):
                        keypoints[entry["image"]] = entry["keypoints"]

        def keypoint_file(image: str) -> Optional[Path]:
            if image in keypoints:
                return path(keypoints[image])
            derived = path(companion_path(image, "keypoints"))
            return derived if image.endswith(".nii.gz") and derived.is_file() else None

        def pair(entry, key: str, k: int) -> Pair:
            if not isinstance(entry, dict) or "moving" not in entry or "fixed" not in entry:
                raise InputError(f"{self.json_path}: entry {k} of '{key}' needs 'moving' and 'fixed' paths, got {entry!r}")
            m, f = entry["moving"], entry["fixed"]
            ml, fl = labels.get(m), labels.get(f)
            has = ml is not None and fl is not None
            # listed pairs only: keypoint files correspond within a listed pair, not across the
            # subjects that unpaired training combines
            listed = key != "training"
            if self.keypoints and listed and keypoint_file(m) is not None and keypoint_file(f) is not None:
                self.keypoint_files[(path(m), path(f))] = (keypoint_file(f), keypoint_file(m))
            return Pair(path(m), path(f), path(ml) if has else None, path(fl) if has else None,
                        id=f"{_stem(Path(m))}->{_stem(Path(f))}")

        val = [pair(e, "registration_val", k) for k, e in enumerate(data.get("registration_val") or [])]
        test = [pair(e, "registration_test", k) for k, e in enumerate(data.get("registration_test") or [])]
        paired = [pair(e, "training_paired_images", k) for k, e in enumerate(data.get("training_paired_images") or [])]
        mode = self.train_pairing
        if mode == "auto":
            mode = "paired" if paired else "random"
        if mode == "paired":
            if not paired:
                raise InputError(f"{self.json_path}: train_pairing=paired but 'training_paired_images' is empty")
            train = paired
        else:
            in_val = {p for pr in val for p in (pr.moving, pr.fixed)}
            images = [e["image"] for e in data.get("training") or [] if isinstance(e, dict) and "image" in e]
            images = [im for im in images if path(im) not in in_val]
            if len(images) < 2:
                raise InputError(f"{self.json_path}: need at least 2 training images outside the validation pairs, found {len(images)}")
            if mode == "all":
                combos = list(itertools.permutations(images, 2))
            else:
                rng = random.Random(self.seed)
                combos = []
                for im in images:
                    others = [o for o in images if o != im]
                    combos += [(im, o) for o in rng.sample(others, min(self.pairs_per_image, len(others)))]
            train = [pair({"moving": m, "fixed": f}, "training", k) for k, (m, f) in enumerate(combos)]
        self.sources = {"train": train, "val": val or None, "test": test or None}

    def setup(self) -> "Learn2RegData":
        if self._is_setup:
            return self
        super().setup()
        try:
            for split, ds in self.datasets.items():  # keypoints ride along with the pairs that have them
                files = [self.keypoint_files.get((p.moving, p.fixed)) for p in ds.pairs]
                if any(f is not None for f in files):
                    self.datasets[split] = KeypointPairDataset(ds, files)
        except BaseException:
            self._is_setup = False  # a second setup() reports the same problem instead of skipping it
            raise
        return self
