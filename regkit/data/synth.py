"""Training pairs synthesised from label maps (SynthMorph): ``dataset=synth_labels``.

Following Hoffmann et al., "SynthMorph: learning contrast-invariant registration without
acquired images", IEEE TMI 41(3), 2022 (voxelmorph's ``train_synthmorph.py`` and neurite's
``labels_to_image`` for the parameter ranges), every training sample is drawn afresh:

1. **Label maps.** A group is drawn (weights ``template``, ``shapes``, ``maps``): regkit's synthetic
   brain template (:func:`regkit.data.synthetic.make_template`, FreeSurfer IDs), a random "shapes"
   map (SynthMorph's data-free model: per label a smooth noise image, each warped by its own
   random field, then the argmax; :func:`random_shapes`), or two maps of the user's files
   (``label_maps``: one protocol, e.g. FreeSurfer aseg files; moving and fixed drawn
   independently, possibly the same map, or one map twice with ``same_map``). A shapes pair is one map used twice.
2. **Deformation.** Each of the two maps is warped (nearest neighbour) by its own random
   diffeomorphism: a stationary velocity field of standard deviation ``U(0, deform)`` voxels on
   ``deform_points`` control points per axis, integrated by scaling and squaring.
3. **Image.** Per map (or shared by the pair with ``same_contrast``), a Gaussian mixture: per label a mean
   ``U(mean)`` and a standard deviation ``U(std)`` (SynthMorph: means 25-225 and SDs 5-25 of 255,
   i.e. ``[0.1, 0.9]`` and ``[0.02, 0.1]`` here), each voxel its label's mean plus its SD times
   N(0, 1); background set to zero with probability ``zero_background`` (0.2); Gaussian blur of
   SD ``U(0, blur)`` voxels per axis (1); a smooth bias field ``exp(U(0, bias) f)`` (0.3); clipped
   at 0, min-max normalised to [0, 1], then gamma ``x^exp(N(0, gamma²))`` (0.25). With
   ``same_contrast`` the pair shares the mixture, the normalisation and the gamma, so a label has
   the same intensity in both images (then image-similarity losses work as well).

So the network sees pairs of random contrasts whose anatomy (the label maps) corresponds, and
learns registration that does not depend on contrast; the recipe trains it with a Dice loss on
the warped label maps (``loss=dice``), as SynthMorph does. Items are the same dicts as
:class:`~regkit.data.pairs.PairDataset`'s (``moving``, ``fixed`` ``(1, *shape)`` float32 in
[0, 1]; ``moving_label``, ``fixed_label`` ``(1, *shape)`` int64 with the maps' own label values;
``spacing``; ``id``). Samples are unlimited: an epoch is ``length`` of them, each a function of
``(seed, epoch, index)`` alone through its own generator
(:func:`~regkit.data.pairs.sample_generator`), so runs are reproducible and resume bitwise with
loader workers. Nothing is written to disk. With ``real_train`` a fraction ``real_fraction`` of
the samples are real pairs from a pair CSV instead (they must carry label maps for label losses).

File maps are brought onto the training grid as the images to be registered lie: reoriented to
``orientation`` (axis codes, e.g. ``LIA`` for ``../shared/data/real``'s common grid) through their
affine, padded or cropped about the centre to ``grid`` voxels, then resized (nearest neighbour)
to ``shape``.
"""
from __future__ import annotations

import glob
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import nibabel
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from regkit.data.augment import smooth_field, uniform
from regkit.data.io import load_volume
from regkit.data.module import PairData, _as_pairs
from regkit.data.pairs import PairDataset, SampleKey, sample_generator
from regkit.data.resample import resize_volume, resized_spacing
from regkit.data.synthetic import make_template
from regkit.errors import InputError, MissingFileError
from regkit.metrics import resolve_labels
from regkit.spatial import integrate_velocity, warp

TEMPLATE_ORIENTATION = "RAS"  # make_template: axis 0 left -> right, 1 posterior -> anterior, 2 inferior -> superior


# -- label maps ---------------------------------------------------------------------------------
def check_label_map(array, name: str) -> np.ndarray:
    """A label map as an int32 array; refuses non-integer values and maps without any label."""
    arr = array.detach().cpu().numpy() if isinstance(array, Tensor) else np.asarray(array)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"{name}: label map must hold integer label values, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            bad = arr[~np.isfinite(arr) | (arr != np.round(arr))].flat[0]
            raise InputError(f"{name}: label map has non-integer values (e.g. {bad!r}); "
                             f"expected integer label IDs")
    if arr.size == 0 or not np.any(arr != 0):
        raise InputError(f"{name}: label map is empty (no nonzero label{'' if arr.size else ', no voxel'})")
    if arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max:
        raise InputError(f"{name}: label values out of the int32 range")
    return arr.astype(np.int32)


def reorient(array: np.ndarray, source: str, target: str) -> np.ndarray:
    """``array`` (axis codes ``source``, e.g. ``RAS``) with its axes permuted and flipped to
    ``target`` (e.g. ``LIA``); no interpolation."""
    ornt = nibabel.orientations.ornt_transform(nibabel.orientations.axcodes2ornt(tuple(source)),
                                               nibabel.orientations.axcodes2ornt(tuple(target)))
    return np.ascontiguousarray(nibabel.orientations.apply_orientation(array, ornt))


def fit_to_grid(array: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """Pad with zeros or crop ``array`` symmetrically about its centre to ``grid`` voxels."""
    out = array
    for axis, size in enumerate(grid):
        n = out.shape[axis]
        if n < size:
            before = (size - n) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, size - n - before)
            out = np.pad(out, pad)
        elif n > size:
            start = (n - size) // 2
            out = np.take(out, np.arange(start, start + size), axis=axis)
    return out


def to_shape(array: np.ndarray, shape: Sequence[int]) -> Tensor:
    """A label map resized (nearest neighbour, corner voxels kept) to ``shape``, int64 tensor."""
    t = torch.from_numpy(np.ascontiguousarray(array).astype(np.int64))[None, None]
    return resize_volume(t, shape, "nearest")[0, 0]


def load_label_map(path, orientation: Optional[str] = None, grid: Optional[Sequence[int]] = None) -> np.ndarray:
    """A label map file (NIfTI/MGH) as an int32 array, reoriented to ``orientation`` (axis codes)
    through its affine and fitted to ``grid`` (:func:`fit_to_grid`) when given."""
    vol = load_volume(path, np.float64, label=True)
    arr = check_label_map(vol.data, str(path))
    if orientation:
        arr = reorient(arr, "".join(nibabel.aff2axcodes(vol.affine)), orientation)
    return fit_to_grid(arr, grid) if grid is not None else arr


def template_map(shape: Sequence[int], orientation: Optional[str] = None) -> np.ndarray:
    """regkit's synthetic brain template (FreeSurfer IDs) at ``shape`` in ``orientation``."""
    if len(shape) != 3:
        raise InputError(f"the brain template is 3-D; got shape {list(shape)}")
    if not orientation:
        return make_template(shape).numpy().astype(np.int32)
    # build it in its own (RAS) axis order with the sizes that land on `shape` after reorienting
    ornt = nibabel.orientations.ornt_transform(nibabel.orientations.axcodes2ornt(tuple(orientation)),
                                               nibabel.orientations.axcodes2ornt(tuple(TEMPLATE_ORIENTATION)))
    ras_shape = [0, 0, 0]
    for axis, (new_axis, _) in enumerate(ornt):
        ras_shape[int(new_axis)] = int(shape[axis])
    return reorient(make_template(ras_shape).numpy().astype(np.int32), TEMPLATE_ORIENTATION, orientation)


def random_shapes(shape: Sequence[int], labels: Sequence[int], generator: torch.Generator,
                  points: Sequence[int] = (4, 8), warp_fraction: float = 0.05) -> Tensor:
    """SynthMorph's random label map ``(*shape)`` int64 with values from ``labels``: per label a
    smooth noise image (normal values on ``points`` control points per axis, each scale with an SD
    drawn from U(0, 1), interpolated and summed), each warped by its own smooth random
    displacement (SD up to ``warp_fraction`` of the mean size, 6 control points per axis), then
    the label of the largest value at each voxel.

    The noise images are built and warped at half resolution and interpolated to ``shape``
    before the argmax (they are smooth: this changes them little and costs 8 times less)."""
    ndim, n = len(shape), len(labels)
    half = [max(2, (s + 1) // 2) for s in shape]
    noise = torch.zeros(n, 1, *half)
    for p in points:
        noise += float(uniform(generator, 0.0, 1.0)) * smooth_field(half, p, n, generator)[0][:, None]
    if warp_fraction > 0:
        sd = float(uniform(generator, 0.0, warp_fraction)) * sum(half) / ndim
        disp = smooth_field(half, 6, n * ndim, generator).reshape(n, ndim, *half) * sd
        noise = warp(noise, disp, padding_mode="border")
    noise = F.interpolate(noise[:, 0][None], size=tuple(shape), mode="trilinear" if ndim == 3 else "bilinear",
                          align_corners=True)[0]
    return torch.as_tensor(list(labels), dtype=torch.int64)[noise.argmax(dim=0)]


# -- deformation and image ----------------------------------------------------------------------
def random_diffeomorphism(shape: Sequence[int], generator: torch.Generator, max_sd: float, points: int,
                          steps: int = 5) -> Tensor:
    """A smooth invertible displacement ``(1, ndim, *shape)`` in voxels: a velocity field of SD
    ``U(0, max_sd)`` voxels at ``points`` control points per axis, interpolated and integrated by
    scaling and squaring (``steps``) on a grid half as fine (as SynthMorph does; the field is
    smooth, and it costs 8 times less)."""
    ndim = len(shape)
    sd = float(uniform(generator, 0.0, max_sd))
    velocity = smooth_field(shape, points, ndim, generator) * sd
    return integrate_velocity(velocity, steps=steps, downsize=2)


def gaussian_blur(image: Tensor, sigmas: Sequence[float]) -> Tensor:
    """Separable Gaussian blur of ``(1, 1, *spatial)`` with SD ``sigmas[k]`` voxels along axis k
    (kernel radius ceil(3 SD); borders replicated); an SD below 0.1 leaves that axis alone."""
    ndim = image.dim() - 2
    conv = F.conv3d if ndim == 3 else F.conv2d
    for axis, s in enumerate(sigmas):
        if s < 0.1:
            continue
        radius = max(1, int(math.ceil(3 * s)))
        x = torch.arange(-radius, radius + 1, dtype=image.dtype)
        k = torch.exp(-0.5 * (x / s) ** 2)
        k = (k / k.sum()).view([1, 1] + [2 * radius + 1 if d == axis else 1 for d in range(ndim)])
        pad = [0] * (2 * ndim)
        pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = radius
        image = conv(F.pad(image, pad, mode="replicate"), k)
    return image


class Contrast:
    """One draw of the Gaussian-mixture intensities: label ``values[k]`` (sorted) gets the mean
    ``mean[k]`` and the SD ``std[k]``; ``zero_background``: whether label 0 is set to 0."""

    def __init__(self, values: Tensor, generator: torch.Generator, mean: Sequence[float], std: Sequence[float],
                 zero_background: float) -> None:
        n = len(values)
        self.values = values
        self.mean = uniform(generator, mean[0], mean[1], n)
        self.std = uniform(generator, std[0], std[1], n)
        background = values == 0
        # the background's range starts at 0 (SynthMorph: means 0-225, SDs 0-25)
        self.mean[background] = uniform(generator, 0.0, mean[1], int(background.sum()))
        self.std[background] = uniform(generator, 0.0, std[1], int(background.sum()))
        self.zero_background = bool(float(uniform(generator, 0.0, 1.0)) < zero_background)


class SynthPairDataset(Dataset):
    """Unlimited synthesised pairs (see the module docstring); ``len`` is the epoch length.

    ``dataset[(epoch, index)]`` synthesises the sample of that key (then ``transform``, e.g.
    augmentation, with the same generator); a plain index gives the epoch-0 sample without the
    transform (:meth:`load`).
    """

    synthesised = True

    def __init__(self, shape: Sequence[int], groups: Mapping[str, float], maps: Sequence[np.ndarray] = (),
                 template: Optional[np.ndarray] = None, length: int = 100, seed: int = 0,
                 shape_labels: Sequence[int] = (), shape_points: Sequence[int] = (4, 8), shape_warp: float = 0.05,
                 deform: float = 2.0, deform_points: int = 5, same_contrast: bool = False,
                 mean: Sequence[float] = (0.1, 0.9), std: Sequence[float] = (0.02, 0.1), zero_background: float = 0.2,
                 blur: float = 1.0, bias: float = 0.3, bias_points: int = 4, gamma: float = 0.25,
                 spacing: Optional[Sequence[float]] = None, real: Optional[Dataset] = None, real_fraction: float = 0.0,
                 same_map: bool = False, transform=None) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.groups = {k: float(v) for k, v in groups.items() if float(v) > 0}
        self.maps = [torch.from_numpy(np.asarray(m, dtype=np.int64)) for m in maps]
        self.template = torch.from_numpy(np.asarray(template, dtype=np.int64)) if template is not None else None
        self.length, self.seed = int(length), int(seed)
        self.shape_labels, self.shape_points, self.shape_warp = tuple(shape_labels), tuple(shape_points), shape_warp
        self.deform, self.deform_points, self.same_contrast = float(deform), int(deform_points), bool(same_contrast)
        self.mean, self.std, self.zero_background = tuple(mean), tuple(std), float(zero_background)
        self.blur, self.bias, self.bias_points, self.gamma = float(blur), float(bias), int(bias_points), float(gamma)
        self.spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * len(self.shape)
        self.real, self.real_fraction = real, float(real_fraction)
        self.same_map, self.transform = bool(same_map), transform
        total = sum(self.groups.values())
        self.group_names = list(self.groups)
        self.cumulative = np.cumsum([self.groups[g] / total for g in self.group_names]) if total else np.zeros(0)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: Union[int, SampleKey]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        generator = sample_generator(self.seed, 0 if epoch is None else epoch, index)
        item = self.draw(generator, f"{0 if epoch is None else epoch}:{index}")
        if self.transform is not None and epoch is not None:
            item = self.transform(item, generator)
        return item

    def load(self, index: int) -> dict:
        """The epoch-0 sample at ``index``, without the transform (what augmentation starts from)."""
        return self[index]

    # -- one sample -------------------------------------------------------------------------------
    def draw(self, generator: torch.Generator, tag: str = "") -> dict:
        """One pair from ``generator``: synthesised, or (with probability ``real_fraction``) real."""
        if self.real is not None and float(uniform(generator, 0.0, 1.0)) < self.real_fraction:
            k = int(torch.randint(len(self.real), (1,), generator=generator))
            return self.real.load(k) if hasattr(self.real, "load") else self.real[k]
        group = self.group_names[int(np.searchsorted(self.cumulative, float(uniform(generator, 0.0, 1.0)),
                                                     side="right").clip(max=len(self.group_names) - 1))]
        if group == "shapes":
            base = random_shapes(self.shape, self.shape_labels, generator, self.shape_points, self.shape_warp)
            pair = (base, base)
        elif group == "template":
            pair = (self.template, self.template)
        else:
            i, j = torch.randint(len(self.maps), (2,), generator=generator).tolist()
            pair = (self.maps[i], self.maps[i if self.same_map else j])
        labels = [self.deformed(lab, generator) for lab in pair]
        values = torch.unique(torch.cat([labels[0].flatten(), labels[1].flatten()]))
        contrast = self.contrast(values, generator)  # drawn in both modes: same_contrast changes only what follows
        raw = [self.render(lab, contrast if self.same_contrast else self.contrast(values, generator), generator)
               for lab in labels]
        if self.same_contrast:  # one intensity scale and one gamma for both: a label keeps its intensity
            images = self.finish(raw, generator)
        else:
            images = [self.finish([r], generator)[0] for r in raw]
        return {"moving": images[0][None], "fixed": images[1][None], "moving_label": labels[0][None],
                "fixed_label": labels[1][None], "spacing": torch.tensor(self.spacing, dtype=torch.float64),
                "id": f"synth-{group}:{tag}"}

    def deformed(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """``labels`` ``(*shape)`` warped by a random diffeomorphism (nearest neighbour; outside
        the volume the border's label, which is background for brain maps)."""
        if self.deform <= 0:
            return labels.clone()
        flow = random_diffeomorphism(self.shape, generator, self.deform, self.deform_points)
        return warp(labels[None, None], flow, mode="nearest", padding_mode="border")[0, 0]

    def contrast(self, values: Tensor, generator: torch.Generator) -> Contrast:
        return Contrast(values, generator, self.mean, self.std, self.zero_background)

    def render(self, labels: Tensor, contrast: Contrast, generator: torch.Generator) -> Tensor:
        """The image ``(*shape)`` float32 of ``labels`` with ``contrast``, blurred and biased,
        clipped at 0, before normalisation."""
        index = torch.searchsorted(contrast.values, labels)
        noise = torch.randn(labels.shape, generator=generator, dtype=torch.float64)
        img = contrast.mean[index] + contrast.std[index] * noise
        if contrast.zero_background:
            img = img * (labels != 0)
        img = img.float()[None, None]
        if self.blur > 0:
            img = gaussian_blur(img, uniform(generator, 0.0, self.blur, len(self.shape)).tolist())
        if self.bias > 0:
            amplitude = float(uniform(generator, 0.0, self.bias))
            img = img * torch.exp(amplitude * smooth_field(self.shape, self.bias_points, 1, generator))
        return img.clamp_min(0)[0, 0]

    def finish(self, images: Sequence[Tensor], generator: torch.Generator) -> List[Tensor]:
        """Min-max normalised to [0, 1] over ``images`` together, then one gamma for all."""
        lo = min(float(x.min()) for x in images)
        hi = max(float(x.max()) for x in images)
        out = [(x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x) for x in images]
        if self.gamma > 0:
            gamma = math.exp(float(torch.randn(1, generator=generator, dtype=torch.float64)) * self.gamma)
            out = [x ** gamma for x in out]
        return out


class SynthLabelData(PairData):
    """``dataset=synth_labels``: training pairs synthesised from label maps (module docstring);
    validation and test pairs, if any, are real pair CSVs (``val``, ``test``) loaded as
    :class:`PairData` loads them.

    Args:
        shape: training grid size, e.g. ``[40, 48, 56]``.
        label_maps: the user's label map files (paths or glob patterns; one protocol), or arrays.
        template, shapes, maps: weights of the three groups (0 = off): regkit's synthetic brain
            template, SynthMorph's random shapes, the ``label_maps``.
        same_map: a pair of the ``label_maps`` group is one map deformed twice (for maps whose
            protocols differ between files); default: two maps drawn independently.
        relabel: ``{value: new value}`` applied to the file maps (e.g. map a 3-class protocol onto
            FreeSurfer IDs so that a Dice loss over ``ixi`` labels counts them).
        orientation: axis codes of the training grid (e.g. ``LIA``); file maps are reoriented to
            it and the template is built in it. ``null``: arrays as stored.
        grid: file maps are padded/cropped about the centre to this size (1 mm voxels assumed)
            before resizing to ``shape``. ``null``: resized as they are.
        length: samples per epoch.
        shape_labels: label values of the shapes maps (a list, or ``ixi``: the 30 IXI IDs).
        shape_points, shape_warp: noise scales and warp of the shapes maps (:func:`random_shapes`).
        deform, deform_points: velocity SD upper bound (voxels of ``shape``) and control points.
        same_contrast: one intensity draw for both images of a pair (then image losses work too).
        mean, std, zero_background, blur, bias, bias_points, gamma: the image model (module
            docstring; defaults are SynthMorph's, on a [0, 1] scale).
        spacing: voxel size at ``shape`` in mm (default: from ``grid`` at 1 mm, else 1).
        real_train, real_fraction: a pair CSV of real pairs, and the fraction of samples taken
            from it (resized to ``shape``, ``normalize``-d).
        seed: the samples' seed (with epoch and index).
        **kwargs: :class:`PairData` options (``val``, ``test``, ``eval_labels``, ``batch_size``,
            ``num_workers``, ``normalize`` of the real pairs, ``transform``, ...); real pairs are
            resized to ``shape`` unless ``resize`` says otherwise.
    """

    def __init__(self, shape: Sequence[int], label_maps: Sequence = (), template: float = 1.0, shapes: float = 1.0,
                 maps: float = 1.0, same_map: bool = False, relabel: Optional[Mapping[int, int]] = None, orientation: Optional[str] = None,
                 grid: Optional[Sequence[int]] = None, length: int = 100, shape_labels: Union[str, Sequence[int]] = "ixi",
                 shape_points: Sequence[int] = (4, 8), shape_warp: float = 0.05, deform: float = 2.0,
                 deform_points: int = 5, same_contrast: bool = False, mean: Sequence[float] = (0.1, 0.9),
                 std: Sequence[float] = (0.02, 0.1), zero_background: float = 0.2, blur: float = 1.0,
                 bias: float = 0.3, bias_points: int = 4, gamma: float = 0.25,
                 spacing: Optional[Sequence[float]] = None, real_train=None, real_fraction: float = 0.0,
                 **kwargs) -> None:
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 3) or min(shape) < 8:
            raise InputError(f"synth_labels shape must be 2 or 3 sizes >= 8, got {list(shape)}")
        weights = {"template": template, "shapes": shapes, "maps": maps}
        for name, w in weights.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise InputError(f"synth_labels {name} weight must be a number >= 0, got {w!r}")
        if not label_maps:
            weights["maps"] = 0.0
        if len(shape) != 3:
            weights["template"] = 0.0
        if sum(weights.values()) <= 0:
            raise InputError("synth_labels: no label maps to synthesise from (template, shapes and maps weights are 0, "
                             "or no label_maps given)")
        for name, (lo, hi) in (("mean", mean), ("std", std)):
            if not 0 <= lo <= hi:
                raise InputError(f"synth_labels {name} must be a range [low, high] with 0 <= low <= high, got {[lo, hi]}")
        for name, value in (("deform", deform), ("blur", blur), ("bias", bias), ("gamma", gamma), ("shape_warp", shape_warp)):
            if not value >= 0:
                raise InputError(f"synth_labels {name} must be >= 0, got {value}")
        if not 0 <= zero_background <= 1 or not 0 <= real_fraction <= 1:
            raise InputError(f"synth_labels zero_background and real_fraction must be in [0, 1], got "
                             f"{zero_background}, {real_fraction}")
        if int(length) < 1:
            raise InputError(f"synth_labels length (samples per epoch) must be >= 1, got {length}")
        if real_fraction > 0 and real_train is None:
            raise InputError("synth_labels real_fraction > 0 needs real_train (a pair CSV)")
        self.synth_shape, self.weights = shape, weights
        self.label_maps = list(label_maps or [])
        self.relabel = {int(k): int(v) for k, v in (relabel or {}).items()}
        self.orientation = orientation
        self.grid = tuple(int(g) for g in grid) if grid is not None else None
        self.length = int(length)
        self.synth_shape_labels = resolve_labels(shape_labels) if shape_labels is not None else ()
        if weights["shapes"] > 0 and len(self.synth_shape_labels) < 2:
            raise InputError(f"synth_labels shape_labels needs >= 2 label values, got {list(self.synth_shape_labels)}")
        self.synth_args = dict(same_map=bool(same_map), shape_points=tuple(int(p) for p in shape_points), shape_warp=float(shape_warp),
                               deform=float(deform), deform_points=int(deform_points), same_contrast=bool(same_contrast),
                               mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                               zero_background=float(zero_background), blur=float(blur), bias=float(bias),
                               bias_points=int(bias_points), gamma=float(gamma))
        if spacing is None:
            spacing = resized_spacing((1.0,) * len(shape), self.grid, shape) if self.grid else (1.0,) * len(shape)
        self.spacing = tuple(float(s) for s in spacing)
        self.real_train, self.real_fraction = real_train, float(real_fraction)
        kwargs.setdefault("normalize", "minmax")  # synthesised images are min-max normalised too
        kwargs.setdefault("resize", shape)        # real validation/test pairs are seen at the training size
        super().__init__(train=None, **kwargs)
        self.maps: List[np.ndarray] = []

    # -- set-up ---------------------------------------------------------------------------------
    def map_files(self) -> List[Path]:
        """The label map files: each entry a path or a glob pattern (sorted matches)."""
        files: List[Path] = []
        for entry in self.label_maps:
            if not isinstance(entry, (str, Path)):
                continue
            text = str(Path(entry).expanduser())
            if glob.has_magic(text):
                found = sorted(Path(p) for p in glob.glob(text))
                if not found:
                    raise MissingFileError(f"{text}: no label map matches")
                files += found
            else:
                files.append(Path(text))
        return files

    def prepare(self) -> None:
        """Load, check and fit every label map once (errors name the file)."""
        maps = []
        for f in self.map_files():
            maps.append((str(f), load_label_map(f, self.orientation, self.grid)))
        for k, entry in enumerate(self.label_maps):
            if not isinstance(entry, (str, Path)):  # an array given in code
                maps.append((f"label_maps[{k}]", check_label_map(entry, f"label_maps[{k}]")))
        self.maps = []
        for name, arr in maps:
            if arr.ndim != len(self.synth_shape):
                raise InputError(f"{name}: {arr.ndim}-D label map for a {len(self.synth_shape)}-D shape {list(self.synth_shape)}")
            if self.relabel:
                out = arr.copy()
                for old, new in self.relabel.items():
                    out[arr == old] = new
                arr = out
            fitted = to_shape(arr, self.synth_shape).numpy().astype(np.int32)
            if not np.any(fitted != 0):
                raise InputError(f"{name}: no label left after resizing to {list(self.synth_shape)}")
            self.maps.append(fitted)

    def setup(self) -> "SynthLabelData":
        if self._is_setup:
            return self
        self.prepare()
        for split in ("val", "test"):
            self.pairs[split] = _as_pairs(self.sources[split], self.csv_root)
            if self.sources[split] is not None and not self.pairs[split]:
                raise InputError(f"the {split} split is empty (source: {self.sources[split]})")
        self.pairs["train"] = _as_pairs(self.real_train, self.csv_root) if self.real_train is not None else []
        if self.validate_level != "none":
            self.check_files()
        for split in ("val", "test"):
            self.datasets[split] = PairDataset(self.pairs[split], normalize=self.normalize, cache=self.cache,
                                               resize=self.resize, seed=self.seed)
        real = None
        if self.pairs["train"]:
            real = PairDataset(self.pairs["train"], normalize=self.normalize, cache=True, resize=self.synth_shape, seed=self.seed)
        template = template_map(self.synth_shape, self.orientation) if self.weights["template"] > 0 else None
        self.datasets["train"] = SynthPairDataset(
            self.synth_shape, self.weights, self.maps, template, self.length, self.seed, self.synth_shape_labels,
            spacing=self.spacing, real=real, real_fraction=self.real_fraction, transform=self.transform,
            **self.synth_args)
        self._is_setup = True
        return self

    def spec(self) -> Dict[str, object]:
        """As :meth:`PairData.spec`, with the synthesis grid as the training size."""
        return {"normalize": self.normalize, "shape": list(self.synth_shape), "resize": list(self.resize) if self.resize else None,
                "eval_labels": self._eval_labels,
                "label_groups": {k: list(v) for k, v in (self.label_groups or {}).items()}}

