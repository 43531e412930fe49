"""The embedded default dataset: seeded, brain-like synthetic volumes written as NIfTI.

A template brain is drawn from ellipsoids carrying FreeSurfer label IDs (cerebral white
matter and a wavy cortex per hemisphere, lateral ventricles, thalamus, caudate, putamen,
hippocampus, brain stem, cerebellum and an outer CSF rim), each with its own T1-like
intensity. Every subject is the template deformed by a smooth random diffeomorphism (a
low-frequency stationary velocity field integrated by scaling and squaring), rendered with
per-subject intensity jitter, partial-volume blur, a smooth bias field and noise. The atlas
is the undeformed template; pairs follow the IXI protocol, atlas (moving) -> subject (fixed).

The files are written once per parameter set (a ``manifest.json`` records them) into a
temporary folder that is renamed into place, then read by the same :class:`PairData` loader
that reads real NIfTI pairs.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from regkit.data.io import save_nifti
from regkit.data.module import PairData
from regkit.data.pairs import Pair, write_pairs_csv
from regkit.errors import InputError
from regkit.spatial import integrate_velocity, warp

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # bump whenever the generator changes: cached datasets are then rebuilt

# name: (left ID, right ID or None, T1-like intensity in [0, 1])
STRUCTURES: Dict[str, Tuple[int, Optional[int], float]] = {
    "cerebral-white-matter": (2, 41, 0.80),
    "cerebral-cortex": (3, 42, 0.55),
    "lateral-ventricle": (4, 43, 0.12),
    "cerebellum-white-matter": (7, 46, 0.76),
    "cerebellum-cortex": (8, 47, 0.58),
    "thalamus": (10, 49, 0.70),
    "caudate": (11, 50, 0.62),
    "putamen": (12, 51, 0.66),
    "hippocampus": (17, 53, 0.50),
    "brain-stem": (16, None, 0.74),
    "csf": (24, None, 0.22),
}


def label_intensities() -> Dict[int, float]:
    out = {0: 0.0}
    for left, right, value in STRUCTURES.values():
        out[left] = value
        if right is not None:
            out[right] = value
    return out


def synthetic_labels() -> List[int]:
    return sorted(k for k in label_intensities() if k != 0)


def _ellipsoid(coords, center, radii) -> torch.Tensor:
    return sum(((c - c0) / r) ** 2 for c, c0, r in zip(coords, center, radii))


def make_template(shape: Sequence[int]) -> torch.Tensor:
    """Template label map ``(*shape)`` int64 with FreeSurfer IDs.

    Axis 0 is left-right (negative = left), axis 1 posterior-anterior, axis 2 inferior-superior,
    all in [-1, 1] across the volume.
    """
    axes = [torch.linspace(-1, 1, s, dtype=torch.float64) for s in shape]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    lab = torch.zeros(tuple(shape), dtype=torch.int64)
    left = x < 0

    def put(mask, name):
        l_id, r_id, _ = STRUCTURES[name]
        if r_id is None:
            lab[mask] = l_id
        else:
            lab[mask & left] = l_id
            lab[mask & ~left] = r_id

    # cerebrum: an ellipsoid whose surface is modulated to imitate gyri
    theta = torch.atan2(y, x)
    wobble = 0.035 * torch.sin(9 * theta) * torch.cos(7 * z) + 0.02 * torch.sin(13 * y + 5 * x)
    rho = torch.sqrt(_ellipsoid((x, y, z - 0.08), (0, 0, 0), (0.78, 0.86, 0.70))) + wobble
    put((rho >= 1.0) & (rho < 1.08), "csf")
    put(rho < 1.0, "cerebral-cortex")
    put(rho < 0.84, "cerebral-white-matter")
    # midline fissure of CSF between the hemispheres
    put((x.abs() < 0.025) & (rho < 1.0) & (z > -0.1), "csf")
    # cerebellum below and behind, brain stem in the middle
    cb = _ellipsoid((x, y, z), (0, -0.55, -0.62), (0.55, 0.30, 0.24))
    put(cb < 1.0, "cerebellum-cortex")
    put(cb < 0.35, "cerebellum-white-matter")
    put(_ellipsoid((x, y, z), (0, -0.18, -0.55), (0.13, 0.14, 0.42)) < 1.0, "brain-stem")
    for sx in (-1, 1):
        put(_ellipsoid((x, y, z), (0.13 * sx, 0.05, 0.18), (0.09, 0.38, 0.14)) < 1.0, "lateral-ventricle")
        put(_ellipsoid((x, y, z), (0.14 * sx, -0.12, 0.0), (0.10, 0.15, 0.11)) < 1.0, "thalamus")
        put(_ellipsoid((x, y, z), (0.22 * sx, 0.28, 0.12), (0.06, 0.13, 0.09)) < 1.0, "caudate")
        put(_ellipsoid((x, y, z), (0.33 * sx, 0.10, 0.0), (0.07, 0.17, 0.11)) < 1.0, "putamen")
        put(_ellipsoid((x, y, z), (0.34 * sx, -0.22, -0.26), (0.07, 0.20, 0.07)) < 1.0, "hippocampus")
    return lab


def _smooth_noise(shape, control: int, gen: torch.Generator, channels: int) -> torch.Tensor:
    """Low-frequency random field ``(1, channels, *shape)`` with unit-ish amplitude."""
    coarse = torch.randn(1, channels, *([control] * len(shape)), generator=gen, dtype=torch.float64)
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)


def random_deformation(shape, gen: torch.Generator, magnitude: float, control: int = 5) -> torch.Tensor:
    """Smooth diffeomorphic displacement ``(1, 3, *shape)`` in voxels, max about ``magnitude``."""
    v = _smooth_noise(shape, control, gen, 3)
    v = v / v.abs().amax().clamp_min(1e-12) * magnitude
    return integrate_velocity(v, steps=7)


def render(labels: torch.Tensor, gen: torch.Generator, noise: float = 0.015) -> torch.Tensor:
    """T1-like image in [0, 1] from a label map: per-label intensity jitter, partial-volume
    blur, smooth multiplicative bias field and Gaussian noise."""
    table = label_intensities()
    img = torch.zeros(labels.shape, dtype=torch.float64)
    for lab, value in table.items():
        if lab:
            img[labels == lab] = value * (1 + 0.04 * torch.randn((), generator=gen, dtype=torch.float64).item())
    img = img[None, None]
    k = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    for d in range(3):  # separable [1, 2, 1]/4 blur, ~0.7 voxel sigma
        shape = [1, 1, 1, 1, 1]
        shape[2 + d] = 3
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - d)] = pad[2 * (2 - d) + 1] = 1
        img = F.conv3d(F.pad(img, pad, mode="replicate"), k.view(shape))
    bias = torch.exp(0.08 * _smooth_noise(labels.shape, 3, gen, 1))
    img = img * bias + noise * torch.randn(img.shape, generator=gen, dtype=torch.float64) * (img > 0.01)
    return img.clamp(0, 1)[0, 0]


def make_subject(template: torch.Tensor, gen: torch.Generator, magnitude: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """One synthetic subject: ``template`` deformed by a random diffeomorphism of at most about
    ``magnitude`` voxels, rendered. Returns (image float64 in [0, 1], labels int64), both ``(*shape)``."""
    phi = random_deformation(template.shape, gen, magnitude)
    labels = warp(template[None, None].double(), phi, mode="nearest")[0, 0].long()
    return render(labels, gen), labels


def synthetic_pair(shape: Sequence[int], seed: int = 0, deform: float = 0.12) -> Tuple[torch.Tensor, torch.Tensor]:
    """The atlas (moving) and the first training subject (fixed) of :func:`generate_synthetic`
    with the same ``shape``, ``seed`` and ``deform``, in memory: two float64 ``(*shape)`` images."""
    shape = tuple(int(s) for s in shape)
    gen = torch.Generator().manual_seed(seed)
    template = make_template(shape)
    atlas = render(template, gen)
    subject, _ = make_subject(template, gen, deform * sum(shape) / 3)
    return atlas, subject


def _affine(shape) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, 3] = -(np.asarray(shape) - 1) / 2.0  # 1 mm voxels, world origin at the centre
    return aff


def generate_synthetic(root, shape=(64, 64, 64), n_train: int = 24, n_val: int = 4, n_test: int = 4,
                       seed: int = 0, deform: float = 0.12, progress: bool = True) -> Path:
    """Write the synthetic dataset under ``root`` (idempotent for the same parameters).

    Args:
        shape: volume size, e.g. (64, 64, 64) or the IXI grid (160, 192, 224).
        n_train, n_val, n_test: subjects per split (each is one atlas->subject pair).
        seed: everything is a deterministic function of this seed.
        deform: maximum velocity magnitude as a fraction of the mean volume size.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise InputError(f"synthetic shape must be 3 sizes >= 16, got {shape}")
    if n_train < 1 or n_val < 0 or n_test < 0:
        raise InputError(f"need n_train >= 1 and n_val, n_test >= 0, got {n_train}, {n_val}, {n_test}")
    params = {"format": FORMAT_VERSION, "shape": list(shape), "n_train": n_train, "n_val": n_val,
              "n_test": n_test, "seed": seed, "deform": deform}
    root = Path(root)
    manifest = root / "manifest.json"
    if manifest.exists():
        try:
            if json.loads(manifest.read_text()).get("params") == params:
                return root
        except (OSError, ValueError):
            pass
        log.info("synthetic data at %s has other parameters; regenerating", root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        _write(tmp, shape, n_train, n_val, n_test, seed, deform, progress)
        (tmp / "manifest.json").write_text(json.dumps({"params": params, "labels": synthetic_labels()}, indent=1))
        if root.exists():
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:  # another process (e.g. another rank) finished first
            if not (manifest.exists() and json.loads(manifest.read_text()).get("params") == params):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write(out: Path, shape, n_train, n_val, n_test, seed, deform, progress) -> None:
    gen = torch.Generator().manual_seed(seed)
    template = make_template(shape)
    aff = _affine(shape)
    (out / "images").mkdir()
    (out / "labels").mkdir()
    save_nifti(out / "images" / "atlas.nii.gz", render(template, gen).numpy().astype(np.float32), aff)
    save_nifti(out / "labels" / "atlas.nii.gz", template.numpy().astype(np.int16), aff)
    magnitude = deform * sum(shape) / 3
    splits = {"train": n_train, "val": n_val, "test": n_test}
    names = []
    total = sum(splits.values())
    with tqdm(total=total, desc=f"generating synthetic data {shape}", unit="subject", disable=not progress) as bar:
        for split, count in splits.items():
            pairs = []
            for k in range(count):
                name = f"{split}_{k:03d}"
                image, lab = make_subject(template, gen, magnitude)
                save_nifti(out / "images" / f"{name}.nii.gz", image.numpy().astype(np.float32), aff)
                save_nifti(out / "labels" / f"{name}.nii.gz", lab.numpy().astype(np.int16), aff)
                pairs.append(Pair(out / "images" / "atlas.nii.gz", out / "images" / f"{name}.nii.gz",
                                  out / "labels" / "atlas.nii.gz", out / "labels" / f"{name}.nii.gz",
                                  id=f"atlas->{name}"))
                names.append(name)
                bar.update(1)
            write_pairs_csv(out / f"{split}_pairs.csv", pairs)


class SyntheticData(PairData):
    """``dataset=synthetic``: generates (once) and loads the embedded synthetic dataset.

    Args:
        root: parent folder; the files go to a subfolder named after the parameters and are
            reused when its manifest matches.
        shape, n_train, n_val, n_test, seed, deform: see :func:`generate_synthetic`.
        **kwargs: :class:`PairData` options (batch_size, cache, normalize, ...).
    """

    def __init__(self, root, shape: Sequence[int] = (64, 64, 64), n_train: int = 24, n_val: int = 4,
                 n_test: int = 4, seed: int = 0, deform: float = 0.12, **kwargs) -> None:
        tag = "x".join(str(int(v)) for v in shape) + f"_n{n_train}-{n_val}-{n_test}_seed{seed}_deform{deform:g}"
        self.root = Path(root) / tag  # one folder per parameter set: switching sizes regenerates nothing
        self.gen_args = dict(shape=tuple(shape), n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, deform=deform)
        kwargs.setdefault("eval_labels", synthetic_labels())
        kwargs.setdefault("normalize", "none")
        super().__init__(train=self.root / "train_pairs.csv",
                         val=self.root / "val_pairs.csv" if n_val else None,
                         test=self.root / "test_pairs.csv" if n_test else None, seed=seed, **kwargs)

    def prepare(self) -> None:
        generate_synthetic(self.root, **self.gen_args)
