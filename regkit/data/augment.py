"""On-the-fly augmentation of registration pairs: the ``augment=`` config group.

:class:`PairAugmentation` is a :class:`~regkit.data.pairs.PairDataset` transform,
``augmentation(item, generator) -> item``, applied to training samples only. Every random number
comes from ``generator``, the sample's own stream (:func:`regkit.data.pairs.sample_generator`,
seeded from the dataset seed, the epoch and the index), never from a global RNG: a run is
reproducible and resumes bitwise, with or without loader workers.

What it does to a pair, in this order:

1. **Spatial**, to the moving and the fixed image independently (each with its label map, by
   nearest neighbour, so that a label map stays aligned with its image): a random affine
   (rotation, scaling, shear, translation) about the volume centre, in millimetres (the item's
   ``spacing``), optionally preceded by a smooth random (elastic) displacement. Affine and
   elastic parts make ONE sampling position per voxel, so each image is interpolated once.
   Independent draws give the network pairs that are not exactly affinely aligned, as in
   TransMorph's and uniGradICON's training; the transformed pair is still a valid
   registration problem (the unknown field just changes).
2. **Flips** of the whole pair (both images and label maps) along ``flip_axes``, each with
   probability ``flip_prob``. Flipping both images of a pair keeps the problem valid. For brains,
   a left-right flip turns a brain into a plausible (mirrored) brain; flips along other axes do
   not (a brain upside down), so the configs flip axis 0 only, which is left-right on the
   common 160×192×224 LIA grid of ``../shared/data/real``, on the IXI grid and in regkit's
   synthetic template. Left and right label IDs are not swapped: both maps of the pair are
   flipped, so overlap losses and Dice stay consistent.
3. **Intensity**, to each image independently: gamma (``x -> lo + (hi - lo) ((x - lo) / (hi - lo))^γ``
   on the image's own range, ``log γ ~ N(0, gamma²)``, MONAI's ``AdjustContrast`` formula), a
   global factor ``exp(U(-contrast, contrast))``, a smooth multiplicative bias field ``exp(b · f)`` (``f`` a unit-variance field interpolated from
   a coarse grid, ``b ~ U(0, bias)``), and Gaussian noise of standard deviation
   ``U(0, noise)`` times the image's range.

Magnitudes are drawn uniformly up to the configured maxima (``rotate`` degrees, ``scale`` a
fraction, ``shear`` a fraction, ``translate`` mm, ``elastic`` mm). A component whose maximum
is 0 is skipped, and with every maximum at 0 (``augment=none``) the item is returned as it came,
bitwise. ``docs/generalisation.md`` gives the light and strong settings and why.

The spatial part is implemented here with :func:`regkit.spatial.sample_at` rather than with
MONAI's ``RandAffined``/``Rand3DElasticd``: MONAI's random transforms draw from a NumPy
``RandomState`` held by the transform object (re-seeded per call from the sample's generator
they would work, but a transform shared by several workers then carries state), return
MetaTensors, and resample affine and elastic parts through their own coordinate conventions; one
sampling position per voxel in regkit's voxel convention keeps the images, the label maps and
the documented geometry in one place. The gamma formula is MONAI's (a test checks the two
agree).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from regkit.errors import InputError
from regkit.spatial import identity_grid, sample_at

IMAGE_KEYS = (("moving", "moving_label"), ("fixed", "fixed_label"))


def uniform(generator: torch.Generator, low: float, high: float, n: int = 1) -> Tensor:
    """``n`` float64 values, uniform in ``[low, high)``, from ``generator``."""
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def smooth_field(shape: Sequence[int], control: int, channels: int, generator: torch.Generator,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """A smooth random field ``(1, channels, *shape)``: standard normal values on a grid of
    ``control`` points per axis (>= 2), interpolated (bi/trilinear, corners aligned) to ``shape``.
    Its values are N(0, 1) at the control points and smaller in between."""
    if control < 2:
        raise InputError(f"a smooth field needs >= 2 control points per axis, got {control}")
    ndim = len(shape)
    coarse = torch.randn(1, channels, *([int(control)] * ndim), generator=generator, dtype=dtype)
    return F.interpolate(coarse, size=tuple(int(s) for s in shape), mode="trilinear" if ndim == 3 else "bilinear",
                         align_corners=True)


def rotation_matrix(angles: Sequence[float]) -> Tensor:
    """Rotation ``(ndim, ndim)`` float64 from radians: one angle in 2-D; in 3-D three angles, the
    rotations about axes 0, 1 and 2 applied in that order."""
    angles = [float(a) for a in angles]
    if len(angles) == 1:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    out = torch.eye(3, dtype=torch.float64)
    for axis, a in enumerate(angles):
        i, j = [k for k in range(3) if k != axis]
        r = torch.eye(3, dtype=torch.float64)
        r[i, i] = r[j, j] = math.cos(a)
        r[i, j], r[j, i] = -math.sin(a), math.sin(a)
        out = r @ out
    return out


def affine_matrix(angles: Sequence[float], scales: Sequence[float], shears: Sequence[float]) -> Tensor:
    """``R @ H @ S`` (``ndim × ndim``, float64): rotation (:func:`rotation_matrix`), shear ``H``
    (identity plus the upper-triangular entries ``shears``, row by row) and scaling ``diag(scales)``."""
    ndim = len(scales)
    shear = torch.eye(ndim, dtype=torch.float64)
    rows, cols = torch.triu_indices(ndim, ndim, offset=1)
    shear[rows, cols] = torch.as_tensor(list(shears), dtype=torch.float64)
    return rotation_matrix(angles) @ shear @ torch.diag(torch.as_tensor(list(scales), dtype=torch.float64))


def sampling_positions(shape: Sequence[int], matrix: Tensor, translation: Tensor, spacing: Sequence[float],
                       displacement: Optional[Tensor] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Where output voxel ``x`` reads the input, ``(1, ndim, *shape)`` in voxels:
    ``y = c + D⁻¹ (M D (x + u(x) - c) + t)``, with ``c`` the volume centre, ``D = diag(spacing)``
    (mm per voxel), ``M`` the affine ``matrix`` acting in mm, ``t`` the ``translation`` in mm and
    ``u`` an optional ``displacement`` ``(1, ndim, *shape)`` in voxels (applied first).

    The output image is ``image(y(x))``: it shows the input moved by the inverse of that map.
    """
    ndim = len(shape)
    d = torch.as_tensor([float(s) for s in spacing], dtype=torch.float64)
    centre = torch.as_tensor([(n - 1) / 2.0 for n in shape], dtype=torch.float64)
    voxel_matrix = (matrix * d.view(1, ndim)) / d.view(ndim, 1)         # D⁻¹ M D
    offset = centre - voxel_matrix @ centre + translation / d          # c - D⁻¹MD c + D⁻¹t
    x = identity_grid(shape, dtype=dtype)
    if displacement is not None:
        x = x + displacement.to(dtype)
    flat = x.reshape(ndim, -1)
    y = voxel_matrix.to(dtype) @ flat + offset.to(dtype).view(ndim, 1)
    return y.reshape(1, ndim, *shape)


def adjust_gamma(image: Tensor, gamma: float) -> Tensor:
    """``lo + (hi - lo) ((x - lo) / (hi - lo))^gamma`` on the image's own range ``[lo, hi]``
    (MONAI's ``AdjustContrast`` without its epsilon); a constant image is returned unchanged."""
    lo, hi = image.min(), image.max()
    if not bool(hi > lo):
        return image
    return lo + (hi - lo) * ((image - lo) / (hi - lo)).clamp_min(0) ** gamma


class PairAugmentation:
    """Random spatial, flip and intensity augmentation of a pair (see the module docstring).

    Called as ``augmentation(item, generator) -> item`` on an item with ``moving``, ``fixed``
    ``(1, *spatial)`` float images, optionally ``moving_label``, ``fixed_label`` ``(1, *spatial)``
    integer maps and ``spacing`` ``(ndim,)`` mm (1 mm when absent). Returns a new dict (the input
    is not modified); other keys are passed through. Every maximum defaults to 0: the default
    object changes nothing.

    Args:
        rotate: maximum rotation about each axis, degrees (``U(-rotate, rotate)``).
        scale: maximum relative scaling per axis (factors in ``[1 - scale, 1 + scale]``).
        shear: maximum shear (off-diagonal entries of the shear matrix in ``[-shear, shear]``).
        translate: maximum translation per axis, mm.
        elastic: maximum elastic displacement per axis, mm (amplitude ``U(0, elastic)`` of a
            smooth field of ``elastic_points`` control points per axis, scaled so that its
            largest component equals the amplitude).
        elastic_points: control points per axis of the elastic field (>= 2; more = less smooth).
        flip_axes: spatial axes along which the whole pair may be flipped (e.g. ``[0]``,
            left-right for brains on the LIA / IXI grids).
        flip_prob: probability of a flip along each axis of ``flip_axes``.
        gamma: standard deviation of ``log γ`` (0: off).
        contrast: intensities are multiplied by ``exp(U(-contrast, contrast))`` (a zero background
            stays zero): the same tissue at another level, as between scanners or normalisations.
        bias: maximum amplitude of the log bias field (0: off).
        bias_points: control points per axis of the bias field.
        noise: maximum noise standard deviation, as a fraction of the image's range.
    """

    def __init__(self, rotate: float = 0.0, scale: float = 0.0, shear: float = 0.0, translate: float = 0.0,
                 elastic: float = 0.0, elastic_points: int = 5, flip_axes: Sequence[int] = (),
                 flip_prob: float = 0.5, gamma: float = 0.0, contrast: float = 0.0, bias: float = 0.0,
                 bias_points: int = 4, noise: float = 0.0) -> None:
        values = dict(rotate=rotate, scale=scale, shear=shear, translate=translate, elastic=elastic, gamma=gamma,
                      contrast=contrast, bias=bias, noise=noise)
        for name, value in values.items():
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value >= 0):
                raise InputError(f"augmentation {name} must be a finite number >= 0, got {value!r}")
        if rotate >= 180:
            raise InputError(f"augmentation rotate is in degrees and must be < 180, got {rotate}")
        if scale >= 1:
            raise InputError(f"augmentation scale must be < 1 (factors in [1 - scale, 1 + scale]), got {scale}")
        if not 0 <= flip_prob <= 1:
            raise InputError(f"augmentation flip_prob must be in [0, 1], got {flip_prob}")
        for name, points in (("elastic_points", elastic_points), ("bias_points", bias_points)):
            if isinstance(points, bool) or not isinstance(points, int) or points < 2:
                raise InputError(f"augmentation {name} must be an integer >= 2, got {points!r}")
        axes = list(flip_axes or [])
        if not all(isinstance(a, int) and not isinstance(a, bool) and a >= 0 for a in axes) or len(set(axes)) != len(axes):
            raise InputError(f"augmentation flip_axes must be distinct spatial axes (0, 1, 2), got {list(axes)!r}")
        self.rotate, self.scale, self.shear, self.translate = float(rotate), float(scale), float(shear), float(translate)
        self.elastic, self.elastic_points = float(elastic), int(elastic_points)
        self.flip_axes, self.flip_prob = tuple(axes), float(flip_prob)
        self.gamma, self.contrast = float(gamma), float(contrast)
        self.bias, self.bias_points, self.noise = float(bias), int(bias_points), float(noise)

    # -- what is enabled ---------------------------------------------------------------------------
    @property
    def affine(self) -> bool:
        return any(v > 0 for v in (self.rotate, self.scale, self.shear, self.translate))

    @property
    def spatial(self) -> bool:
        """Whether voxels move (affine, elastic or flips): keypoints would have to move too."""
        return self.affine or self.elastic > 0 or (bool(self.flip_axes) and self.flip_prob > 0)

    @property
    def intensity(self) -> bool:
        return self.gamma > 0 or self.contrast > 0 or self.bias > 0 or self.noise > 0

    @property
    def enabled(self) -> bool:
        return self.spatial or self.intensity

    def __repr__(self) -> str:
        keys = ("rotate", "scale", "shear", "translate", "elastic", "flip_axes", "gamma", "contrast", "bias", "noise")
        on = [f"{k}={getattr(self, k)!r}" for k in keys if getattr(self, k)]
        return f"PairAugmentation({', '.join(on) or 'off'})"

    # -- the transform ---------------------------------------------------------------------------
    def __call__(self, item: Dict[str, Any], generator: torch.Generator) -> Dict[str, Any]:
        if not self.enabled:
            return item
        out = dict(item)
        image = out["moving"]
        ndim = image.dim() - 1
        if ndim not in (2, 3) or out["fixed"].shape != image.shape:
            raise InputError(f"augmentation expects moving and fixed of one shape (1, *spatial) with 2 or 3 spatial "
                             f"dims, got {tuple(image.shape)} and {tuple(out['fixed'].shape)}")
        if self.flip_axes and max(self.flip_axes) >= ndim:
            raise InputError(f"augmentation flip_axes {list(self.flip_axes)} do not exist in {ndim}-D images")
        spacing = out.get("spacing")
        spacing = [float(s) for s in spacing] if spacing is not None else [1.0] * ndim
        for image_key, label_key in IMAGE_KEYS:
            if self.affine or self.elastic > 0:
                coords = self.draw_positions(tuple(out[image_key].shape[1:]), spacing, generator)
                out[image_key] = sample_at(out[image_key][None], coords)[0]
                if out.get(label_key) is not None:
                    out[label_key] = sample_at(out[label_key][None], coords, mode="nearest")[0]
            if self.intensity:
                out[image_key] = self.adjust_intensity(out[image_key], generator)
        if self.flip_axes and self.flip_prob > 0:
            draws = torch.rand(len(self.flip_axes), generator=generator, dtype=torch.float64)
            dims = [1 + a for a, d in zip(self.flip_axes, draws) if float(d) < self.flip_prob]
            if dims:
                for key in ("moving", "fixed", "moving_label", "fixed_label"):
                    if out.get(key) is not None:
                        out[key] = torch.flip(out[key], dims)
        return out

    def draw_positions(self, shape: Tuple[int, ...], spacing: Sequence[float], generator: torch.Generator) -> Tensor:
        """One image's random sampling positions ``(1, ndim, *shape)`` (:func:`sampling_positions`)."""
        ndim = len(shape)
        n_angles = 1 if ndim == 2 else 3
        angles = uniform(generator, -self.rotate, self.rotate, n_angles) * (math.pi / 180)
        scales = 1 + uniform(generator, -self.scale, self.scale, ndim)
        shears = uniform(generator, -self.shear, self.shear, ndim * (ndim - 1) // 2)
        translation = uniform(generator, -self.translate, self.translate, ndim)
        displacement = None
        if self.elastic > 0:
            amplitude = float(uniform(generator, 0.0, self.elastic))
            field = smooth_field(shape, self.elastic_points, ndim, generator)
            field = field / field.abs().amax().clamp_min(1e-12) * amplitude          # mm
            displacement = field / torch.as_tensor(spacing, dtype=field.dtype).view(1, ndim, *([1] * ndim))
        return sampling_positions(shape, affine_matrix(angles.tolist(), scales.tolist(), shears.tolist()),
                                  translation, spacing, displacement)

    def adjust_intensity(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """Gamma, contrast, bias field and noise for one image ``(1, *spatial)`` (each when enabled)."""
        if self.gamma > 0:
            gamma = math.exp(float(torch.randn(1, generator=generator, dtype=torch.float64)) * self.gamma)
            image = adjust_gamma(image, gamma)
        if self.contrast > 0:
            image = image * math.exp(float(uniform(generator, -self.contrast, self.contrast)))
        if self.bias > 0:
            amplitude = float(uniform(generator, 0.0, self.bias))
            field = smooth_field(tuple(image.shape[1:]), self.bias_points, 1, generator, image.dtype)[0]
            image = image * torch.exp(amplitude * field)
        if self.noise > 0:
            sigma = float(uniform(generator, 0.0, self.noise)) * float(image.max() - image.min())
            image = image + sigma * torch.randn(image.shape, generator=generator, dtype=image.dtype)
        return image
