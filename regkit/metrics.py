"""Evaluation metrics on label maps and deformation fields.

Label maps are integer tensors ``(B, 1, *spatial)`` or ``(B, *spatial)`` holding label values
(e.g. FreeSurfer IDs), not class indices. Flows are ``(B, ndim, *spatial)`` displacements in
voxels (regkit's convention, see :mod:`regkit.spatial`). The conventions (absent labels, empty
structures, folded voxels) are stated in each docstring and collected in ``docs/evaluation.md``.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from regkit.errors import InputError, check_choice
from regkit.keypoints import keypoint_distances
from regkit.spatial import identity_grid, jacobian_determinant, sample_at

# The 30 FreeSurfer structures evaluated on IXI (TransMorph protocol).
IXI_LABELS: Tuple[int, ...] = (2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31,
                               41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54, 60, 63)

# The 17 structures of the published IXI tables: each left/right pair of the 30 labels is
# averaged into one structure; midline structures stand alone. Order and names follow the
# TransMorph IXI evaluation (IXI/analysis.py, IXI/Anatomical_Structures.md).
IXI_STRUCTURES: Dict[str, Tuple[int, ...]] = {
    "Brain-Stem": (16,),
    "Thalamus": (10, 49),
    "Cerebellum-Cortex": (8, 47),
    "Cerebral-White-Matter": (2, 41),
    "Cerebellum-White-Matter": (7, 46),
    "Putamen": (12, 51),
    "VentralDC": (28, 60),
    "Pallidum": (13, 52),
    "Caudate": (11, 50),
    "Lateral-Ventricle": (4, 43),
    "Hippocampus": (17, 53),
    "3rd-Ventricle": (14,),
    "4th-Ventricle": (15,),
    "Amygdala": (18, 54),
    "Cerebral-Cortex": (3, 42),
    "CSF": (24,),
    "Choroid-Plexus": (31, 63),
}

# FreeSurfer colour-table names of the labels regkit's tables print.
FREESURFER_NAMES: Dict[int, str] = {
    2: "Left-Cerebral-White-Matter", 3: "Left-Cerebral-Cortex", 4: "Left-Lateral-Ventricle",
    5: "Left-Inf-Lat-Vent", 7: "Left-Cerebellum-White-Matter", 8: "Left-Cerebellum-Cortex",
    10: "Left-Thalamus", 11: "Left-Caudate", 12: "Left-Putamen", 13: "Left-Pallidum",
    14: "3rd-Ventricle", 15: "4th-Ventricle", 16: "Brain-Stem", 17: "Left-Hippocampus",
    18: "Left-Amygdala", 24: "CSF", 26: "Left-Accumbens-area", 28: "Left-VentralDC",
    30: "Left-vessel", 31: "Left-choroid-plexus", 41: "Right-Cerebral-White-Matter",
    42: "Right-Cerebral-Cortex", 43: "Right-Lateral-Ventricle", 44: "Right-Inf-Lat-Vent",
    46: "Right-Cerebellum-White-Matter", 47: "Right-Cerebellum-Cortex", 49: "Right-Thalamus",
    50: "Right-Caudate", 51: "Right-Putamen", 52: "Right-Pallidum", 53: "Right-Hippocampus",
    54: "Right-Amygdala", 58: "Right-Accumbens-area", 60: "Right-VentralDC", 62: "Right-vessel",
    63: "Right-choroid-plexus", 72: "5th-Ventricle", 77: "WM-hypointensities",
    80: "non-WM-hypointensities", 85: "Optic-Chiasm", 251: "CC_Posterior",
    252: "CC_Mid_Posterior", 253: "CC_Central", 254: "CC_Mid_Anterior", 255: "CC_Anterior",
}

# Named label sets, so a config can say ``eval_labels: ixi`` / ``label_groups: ixi``.
LABEL_SETS: Dict[str, Tuple[int, ...]] = {"ixi": IXI_LABELS}
LABEL_GROUPS: Dict[str, Dict[str, Tuple[int, ...]]] = {"ixi": IXI_STRUCTURES}

# How a moving label map is warped for Dice: nearest neighbour on the IDs, or linear on one-hot maps.
LABEL_MODES = ("nearest", "linear")


def resolve_labels(labels) -> Optional[Tuple[int, ...]]:
    """``None``, a name from :data:`LABEL_SETS` (``"ixi"``) or a sequence of ints -> tuple."""
    if labels is None:
        return None
    if isinstance(labels, str):
        check_choice("label set", labels, LABEL_SETS)  # or a list of label values
        return LABEL_SETS[labels]
    return tuple(int(v) for v in labels)


def resolve_groups(groups) -> Optional[Dict[str, Tuple[int, ...]]]:
    """``None``, a name from :data:`LABEL_GROUPS` (``"ixi"``) or ``{name: [labels]}`` -> dict."""
    if groups is None:
        return None
    if isinstance(groups, str):
        check_choice("label grouping", groups, LABEL_GROUPS)  # or a mapping name -> labels
        return dict(LABEL_GROUPS[groups])
    return {str(k): tuple(int(v) for v in vs) for k, vs in dict(groups).items()}


def _squeeze_labels(label_map: Tensor) -> Tensor:
    if label_map.dim() >= 4 and label_map.shape[1] == 1:
        return label_map[:, 0]
    return label_map


def one_hot(label_map: Tensor, labels: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """``(B, len(labels), *spatial)``: channel k is 1 where ``label_map == labels[k]``."""
    lm = _squeeze_labels(label_map)
    values = torch.as_tensor(list(labels), device=lm.device)
    shape = (1, -1) + (1,) * (lm.dim() - 1)
    return (lm.unsqueeze(1) == values.to(lm.dtype).view(shape)).to(dtype)


def dice(pred: Tensor, target: Tensor, labels: Sequence[int]) -> Tensor:
    """Per-label Dice ``2|A∩B| / (|A| + |B|)``, shape ``(B, len(labels))``, float64.

    A label absent from both maps gives NaN, so that averages (``torch.nanmean``) skip it
    instead of counting a perfect or a zero score for a structure that is not there. A label
    present in one map only gives 0.
    """
    p, t = _squeeze_labels(pred), _squeeze_labels(target)
    if p.shape != t.shape:
        raise InputError(f"dice: label maps must have the same shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    if len(labels) == 0:
        raise InputError("dice: no labels to evaluate")
    b = p.shape[0]
    # One pass instead of one per label: map each voxel to its label's column (0 = not evaluated),
    # then a joint histogram of (pred column, target column) per batch item gives every overlap.
    p, t = label_columns(p.reshape(b, -1), labels), label_columns(t.reshape(b, -1), labels)
    n = len(labels) + 1
    offset = torch.arange(b, device=p.device).view(b, 1) * (n * n)
    joint = torch.bincount((offset + p * n + t).reshape(-1), minlength=b * n * n).view(b, n, n)
    inter = joint.diagonal(dim1=1, dim2=2)[:, 1:].double()
    size = (joint.sum(2) + joint.sum(1))[:, 1:].double()  # |A| (row sums) + |B| (column sums)
    return torch.where(size > 0, 2 * inter / size.clamp_min(1), torch.full_like(size, float("nan")))


def label_columns(label_map: Tensor, labels: Sequence[int]) -> Tensor:
    """``k + 1`` where ``label_map == labels[k]``, 0 elsewhere (int64, same shape)."""
    values = torch.as_tensor([int(v) for v in labels], dtype=torch.int64, device=label_map.device)
    if len(set(values.tolist())) != len(values):
        raise InputError(f"labels must be distinct, got {list(labels)}")
    x = label_map.to(torch.int64)
    lo, hi = (int(v) for v in torch.aminmax(x)) if x.numel() else (0, 0)
    vlo, vhi = int(values.min()), int(values.max())
    if min(lo, vlo) >= 0 and max(hi, vhi) < 2 ** 20:  # the usual case (FreeSurfer ids < 15000): a lookup table
        lut = torch.zeros(max(hi, vhi) + 1, dtype=torch.int64, device=x.device)
        lut[values] = torch.arange(1, len(values) + 1, device=x.device)
        return lut[x]
    sorted_values, order = values.sort()
    pos = torch.searchsorted(sorted_values, x).clamp_(max=len(values) - 1)
    return torch.where(sorted_values[pos] == x, order[pos] + 1, torch.zeros_like(x))


def mean_dice(pred: Tensor, target: Tensor, labels: Sequence[int]) -> Tensor:
    """Mean Dice over the labels present, per batch item ``(B,)``."""
    return torch.nanmean(dice(pred, target, labels), dim=1)


def group_scores(per_label: Tensor, labels: Sequence[int], groups: Mapping[str, Sequence[int]]) -> Tensor:
    """Average per-label scores into groups, e.g. the IXI left/right pairs into 17 structures.

    Args:
        per_label: ``(B, len(labels))`` scores (Dice, HD95, ...), NaN where undefined.
        labels: the label value of each column.
        groups: ``{name: member labels}``; every member must be one of ``labels``.
    Returns:
        ``(B, len(groups))``: the mean over each group's members that are not NaN (NaN when all
        are NaN), columns in the order of ``groups``.
    """
    index = {int(v): k for k, v in enumerate(labels)}
    missing = sorted({int(m) for ms in groups.values() for m in ms} - set(index))
    if missing:
        raise InputError(f"label groups use labels {missing} that are not among the evaluated labels {list(labels)}")
    cols = [torch.nanmean(per_label[:, [index[int(m)] for m in ms]], dim=1) for ms in groups.values()]
    return torch.stack(cols, dim=1)


# -- deformation fields -------------------------------------------------------------------------
def jacobian_metrics(flow: Tensor, mask: Optional[Tensor] = None, det: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Folding and smoothness of ``x + flow(x)``, per batch item.

    Args:
        flow: ``(B, ndim, *spatial)`` displacement in voxels (any dtype; computed in float64).
        mask: optional ``(B, *spatial)`` or ``(B, 1, *spatial)`` boolean region (e.g. the fixed
            image's foreground); ``None`` means every voxel.
        det: ``jacobian_determinant(flow.double())`` when the caller has it already (it is the
            costly part at full size), else computed here.
    Returns:
        ``{"nonpos_jac_pct": (B,), "sdlogj": (B,)}`` (float64):

        * ``nonpos_jac_pct``: 100 × (voxels with det J <= 0) / voxels in the region, where J is
          the Jacobian of ``x + flow(x)`` from central differences (one-sided at the border, as
          ``np.gradient``); see :func:`regkit.spatial.jacobian_determinant`. Voxel units: the
          determinant is a volume ratio, so the voxel size cancels.
        * ``sdlogj``: population standard deviation of ``log(det J)`` over the region's voxels
          with det J > 0. Folded voxels (det J <= 0) have no logarithm; they are left out here
          and counted by ``nonpos_jac_pct``. No offset is added to det J (Learn2Reg's current
          script adds 3 before the log; regkit does not), so a pure translation gives 0.
          NaN when no voxel has det J > 0.
    """
    det = jacobian_determinant(flow.double()) if det is None else det
    b = det.shape[0]
    det = det.reshape(b, -1)
    if mask is None:
        region = torch.ones_like(det, dtype=torch.bool)
    else:
        region = _squeeze_labels(mask).reshape(b, -1).bool()
        if region.shape != det.shape:
            raise InputError(f"jacobian mask has {region.shape[1]} voxels per item, the flow {det.shape[1]}")
    n = region.sum(1).double()
    nonpos = ((det <= 0) & region).sum(1).double()
    positive = (det > 0) & region
    logd = torch.where(positive, det.clamp_min(torch.finfo(det.dtype).tiny).log(), torch.zeros_like(det))
    m = positive.sum(1).double()
    mean = logd.sum(1) / m.clamp_min(1)
    var = (torch.where(positive, logd - mean[:, None], torch.zeros_like(det)) ** 2).sum(1) / m.clamp_min(1)
    nan = torch.full_like(n, float("nan"))
    return {"nonpos_jac_pct": torch.where(n > 0, 100 * nonpos / n.clamp_min(1), nan),
            "sdlogj": torch.where(m > 0, var.sqrt(), nan)}


# -- surface distances --------------------------------------------------------------------------
def _surface(mask: Tensor) -> Tensor:
    """Voxels of ``mask`` with at least one of their 2·ndim face neighbours outside it (outside
    the array counts as outside)."""
    interior = mask.clone()
    for axis in range(mask.dim()):
        n = mask.shape[axis]
        if n < 3:
            return mask.clone()
        inner = interior.narrow(axis, 1, n - 2)
        inner &= mask.narrow(axis, 0, n - 2) & mask.narrow(axis, 2, n - 2)
        interior.narrow(axis, 0, 1).zero_()
        interior.narrow(axis, n - 1, 1).zero_()
    return mask & ~interior


def _min_plus_band(f: Tensor, axis: int, step: float, radius: int) -> Tensor:
    """``out[i] = min_{|o| <= radius} f[i + o] + (o * step)²`` along ``axis`` (inside the array)."""
    out = f.clone()
    n = f.shape[axis]
    for o in range(1, min(radius, n - 1) + 1):
        cost = (o * step) ** 2
        lo, hi = f.narrow(axis, 0, n - o), f.narrow(axis, o, n - o)
        # neighbour at +o seen from the low part, and at -o seen from the high part
        torch.minimum(out.narrow(axis, 0, n - o), hi + cost, out=out.narrow(axis, 0, n - o))
        torch.minimum(out.narrow(axis, o, n - o), lo + cost, out=out.narrow(axis, o, n - o))
    return out


def _squared_distance_at(zero: Tensor, query: Tensor, spacing: Sequence[float], q: float = 1.0,
                         radius_mm: float = 8.0) -> Tensor:
    """Squared Euclidean distances (mm², float64) from each ``query`` voxel to the nearest
    ``True`` voxel of ``zero`` (both bool of one shape; ``zero`` non-empty), exact at least up
    to the ``q`` quantile.

    Separable minimisation along each axis in turn (Saito and Toriwaki's decomposition of the
    squared distance transform), restricted to offsets within ``radius`` mm per axis. A result
    ``v <= radius²`` is exact: the nearest voxel then lies within the band on every axis; a
    larger one is only an upper bound, and is larger than every exact one. The band widens
    until the values that ``torch.quantile(values, q)`` interpolates between are exact (all of
    them for ``q = 1``), so the cost follows the distances present, not the image size.
    """
    sizes = [n * s for n, s in zip(zero.shape, spacing)]
    limit = math.sqrt(sum(x * x for x in sizes))
    base = torch.where(zero, 0.0, math.inf).double()
    n_query = int(query.sum())
    need = min(n_query, int(math.ceil(q * (n_query - 1))) + 1)  # sorted positions 0..need-1 must be exact
    radius = float(radius_mm)
    while True:
        f = base
        for axis, s in enumerate(spacing):
            f = _min_plus_band(f, axis, float(s), int(math.ceil(radius / float(s))))
        values = f[query]
        exact = values <= radius * radius
        if int(exact.sum()) >= need or radius >= limit:
            return values
        # widen to cover the farthest value that must become exact (an upper bound on it)
        bound = values[~exact].sort().values[need - int(exact.sum()) - 1]
        radius = min(max(2 * radius, float(bound.sqrt()) if torch.isfinite(bound) else limit), limit)


def _directed_quantile(src: Tensor, dst: Tensor, spacing: Sequence[float], q: float) -> Tensor:
    """The ``q`` quantile (mm) of the distances from the surface voxels of ``src`` to the
    nearest surface voxel of ``dst`` (both bool, non-empty)."""
    d2 = _squared_distance_at(_surface(dst), _surface(src), spacing, q)
    return torch.quantile(d2.sqrt(), q)


def _bounding_box(mask: Tensor) -> Tuple[slice, ...]:
    box = []
    for axis in range(mask.dim()):
        other = [d for d in range(mask.dim()) if d != axis]
        hit = mask.any(dim=other) if other else mask
        idx = hit.nonzero()[:, 0]
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def hd95(pred: Tensor, target: Tensor, labels: Sequence[int], spacing: Optional[Sequence[float]] = None,
         percentile: float = 95.0) -> Tensor:
    """95th-percentile symmetric Hausdorff distance between label surfaces, in mm.

    For each label, the surface of a structure is its voxels with a face neighbour outside it
    (the image border counts as outside). ``d(A→B)`` are the Euclidean distances, in mm using
    ``spacing``, from each surface voxel of A to the nearest surface voxel of B (exact, not
    approximated). HD95 = max(q95(d(A→B)), q95(d(B→A))), with q95 the linearly interpolated
    95th percentile (``torch.quantile``), as in MONAI's ``compute_hausdorff_distance``.

    Args:
        pred, target: label maps ``(B, 1, *spatial)`` or ``(B, *spatial)``.
        labels: the label values to evaluate.
        spacing: voxel size in mm along each spatial axis (default 1 mm).
        percentile: 95 for HD95; 100 gives the classic Hausdorff distance.
    Returns:
        ``(B, len(labels))`` float64 in mm. A label absent from both maps gives NaN (skipped by
        ``nanmean``, like :func:`dice`); a label present in one map only gives ``inf``, because
        a lost structure has no finite distance (averages over it are ``inf`` on purpose).
    """
    p, t = _squeeze_labels(pred), _squeeze_labels(target)
    if p.shape != t.shape:
        raise InputError(f"hd95: label maps must have the same shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    ndim = p.dim() - 1
    spacing = (1.0,) * ndim if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != ndim or any(s <= 0 for s in spacing):
        raise InputError(f"hd95: spacing must be {ndim} positive values in mm, got {spacing}")
    if not 0 <= percentile <= 100:
        raise InputError(f"hd95: percentile must be in [0, 100], got {percentile}")
    out = torch.empty(p.shape[0], len(labels), dtype=torch.float64)
    for i in range(p.shape[0]):
        for k, lab in enumerate(labels):
            a, b = p[i] == lab, t[i] == lab
            has_a, has_b = bool(a.any()), bool(b.any())
            if not (has_a or has_b):
                out[i, k] = math.nan
                continue
            if not (has_a and has_b):
                out[i, k] = math.inf
                continue
            # Nearest points lie inside the joint bounding box, so cropping to it is exact.
            box = _bounding_box(a | b)
            a, b = a[box], b[box]
            q = percentile / 100.0
            out[i, k] = max(float(_directed_quantile(a, b, spacing, q)), float(_directed_quantile(b, a, spacing, q)))
    return out


# -- everything about one pair -------------------------------------------------------------------
def sample_labels(label_map: Tensor, coords: Tensor, labels: Sequence[int], mode: str = "nearest") -> Tensor:
    """An integer label map ``(B, 1, *in)`` sampled at voxel coordinates ``(B|1, ndim, *out)``
    (:func:`regkit.spatial.sample_at`).

    ``nearest`` resamples the IDs directly; ``linear`` samples the one-hot maps of ``labels``
    (plus background) linearly and takes the arg-max, as the published IXI tables since 2022
    do. Published Dice moves by ~0.005-0.01 between the two, so the mode is always recorded.
    """
    check_choice("label_mode", mode, LABEL_MODES)
    if mode == "nearest":
        return sample_at(label_map.double(), coords.double(), mode="nearest").round().long()
    ids = [0] + [int(v) for v in labels if v != 0]
    sampled = sample_at(one_hot(label_map, ids, dtype=coords.dtype), coords, mode="bilinear")
    return torch.as_tensor(ids, device=coords.device)[sampled.argmax(1, keepdim=True)]


def warp_labels(label_map: Tensor, flow: Tensor, labels, mode: str = "nearest") -> Tensor:
    """Warp an integer label map ``(B, 1, *spatial)`` by ``flow`` (voxels), nearest or linear
    (one-hot) as in :func:`sample_labels`."""
    if mode == "nearest":  # positions in float64, so that a voxel centre is not rounded across a boundary
        flow = flow.double()
    elif flow.dtype in (torch.float16, torch.bfloat16):
        flow = flow.float()
    coords = identity_grid(flow.shape[2:], flow.device, flow.dtype) + flow
    return sample_labels(label_map, coords, labels, mode)


@torch.no_grad()
def pair_metrics(flow: Tensor, moving_label: Optional[Tensor] = None, fixed_label: Optional[Tensor] = None,
                 labels: Optional[Sequence[int]] = None, spacing: Optional[Sequence[float]] = None,
                 label_mode: str = "nearest", with_hd95: bool = False,
                 groups: Optional[Mapping[str, Sequence[int]]] = None) -> Dict[str, Tensor]:
    """Every metric of one batch.

    Args:
        flow: ``(B, ndim, *spatial)`` displacement in voxels.
        moving_label, fixed_label: ``(B, 1, *spatial)`` label maps (optional: without them only
            the Jacobian metrics are computed).
        labels: evaluated label values.
        spacing: voxel size in mm (HD95); default 1 mm.
        label_mode: ``nearest`` or ``linear`` label warping.
        with_hd95: compute HD95 (costly at full size: seconds per pair on a CPU).
        groups: optional ``{name: labels}`` averaged into group scores (e.g. the IXI 17).
    Returns:
        ``dice`` ``(B, L)``, ``dice_mean`` ``(B,)``, ``dice_groups`` ``(B, G)`` and
        ``dice_groups_mean`` ``(B,)`` with groups, ``hd95`` ``(B, L)`` and ``hd95_mean`` ``(B,)`` (mm)
        when asked, ``nonpos_jac_pct`` and ``sdlogj`` ``(B,)``; all float64 on the CPU.
    """
    out = {k: v.cpu() for k, v in jacobian_metrics(flow).items()}
    if moving_label is None or fixed_label is None or not labels:
        return out
    warped = warp_labels(moving_label, flow, labels, label_mode)
    per_label = dice(warped, fixed_label, labels).cpu()
    out["dice"] = per_label
    out["dice_mean"] = torch.nanmean(per_label, dim=1)
    if groups:
        g = group_scores(per_label, labels, groups)
        out["dice_groups"] = g
        out["dice_groups_mean"] = torch.nanmean(g, dim=1)
    if with_hd95:
        h = hd95(warped, fixed_label, labels, spacing)
        out["hd95"] = h
        out["hd95_mean"] = torch.nanmean(h, dim=1)
    return out


# -- keypoints ----------------------------------------------------------------------------------
def keypoint_metrics(flow: Tensor, fixed_kp, moving_kp, spacing=None, mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Target registration error (TRE) of corresponding keypoints, per batch item.

    The fixed keypoints ``p`` are moved by the flow sampled at them (linear interpolation,
    :func:`regkit.keypoints.sample_points`) and compared with the moving keypoints ``q``:
    ``TRE_i = ||(p_i + u(p_i) - q_i) * spacing||`` in mm. This is the Learn2Reg evaluation's
    ``compute_tre`` (which interpolates with a cubic spline: the same values where the fixed
    keypoints lie on voxel centres, as the corrfield keypoints of its lung tasks do; see
    ``docs/learn2reg.md``).

    Args:
        flow: ``(B, ndim, *spatial)`` displacement in voxels on the fixed grid.
        fixed_kp, moving_kp: ``(B, N, ndim)`` or ``(N, ndim)`` voxel coordinates.
        spacing: voxel size in mm (the moving image's, as the challenge), ``(ndim,)`` or
            ``(B, ndim)``; ``None`` gives voxel units.
        mask: optional ``(B, N)`` bool, the valid keypoints of padded batches
            (:class:`regkit.data.keypoints.KeypointPairDataset` pads to one length).
    Returns:
        float64 ``(B,)`` tensors: ``tre`` (mean over the valid keypoints, mm) and
        ``tre_initial`` (the same without the flow: ``||(p - q) * spacing||``); NaN for a pair
        without valid keypoints.
    """
    flow = flow.double()
    after = keypoint_distances(flow, fixed_kp, moving_kp, spacing)
    before = keypoint_distances(torch.zeros_like(flow[:1]), fixed_kp, moving_kp, spacing)
    valid = torch.ones_like(after, dtype=torch.bool) if mask is None else torch.as_tensor(mask, device=after.device).bool()
    if valid.dim() == 1:
        valid = valid.unsqueeze(0)
    if valid.shape[-1] != after.shape[-1]:
        raise InputError(f"keypoint mask has {valid.shape[-1]} entries per pair, the keypoints {after.shape[-1]}")
    n = valid.sum(-1).double()

    def mean(d: Tensor) -> Tensor:
        s = torch.where(valid, d, torch.zeros_like(d)).sum(-1)
        return torch.where(n > 0, s / n.clamp_min(1), torch.full_like(s, float("nan")))

    return {"tre": mean(after), "tre_initial": mean(before.expand_as(after))}


# -- the Learn2Reg challenge's variants ---------------------------------------------------------
# The current Learn2Reg evaluation (MDL-UzL/L2R, evaluation/evaluation.py and utils.py) computes
# det J on the interior (2 voxels cropped from every side), adds 3 and clips to [1e-9, 1e9]
# before the logarithm. regkit's own jacobian_metrics adds nothing; docs/learn2reg.md compares.
L2R_JACOBIAN_OFFSET = 3.0
L2R_JACOBIAN_CLIP = (1e-9, 1e9)
L2R_JACOBIAN_CROP = 2


def l2r_sdlogj(flow: Tensor, mask: Optional[Tensor] = None, det: Optional[Tensor] = None) -> Tensor:
    """The Learn2Reg challenge's ``LogJacDetStd``, per batch item ``(B,)`` float64.

    ``std(log(clip(det J + 3, 1e-9, 1e9)))`` (population std) over the voxels at least 2 voxels
    from the border, with det J from central differences (:func:`regkit.spatial.jacobian_determinant`,
    whose interior values are the challenge's). With ``mask`` (the fixed image's mask, tasks with
    ``masked_evaluation``) only the interior voxels where ``mask == 1`` count, as the challenge's
    masked array does. Because of the +3, folds (det J <= 0) are not excluded and the value is
    not regkit's ``sdlogj``; a translation gives 0 in both. ``det``: as in :func:`jacobian_metrics`.
    """
    c = L2R_JACOBIAN_CROP
    det = jacobian_determinant(flow.double()) if det is None else det
    if any(n <= 2 * c for n in det.shape[1:]):
        raise InputError(f"l2r_sdlogj: the field {tuple(flow.shape)} has no voxels {c} away from every border")
    inner = (slice(None),) + (slice(c, -c),) * (det.dim() - 1)
    logd = (det[inner] + L2R_JACOBIAN_OFFSET).clamp(*L2R_JACOBIAN_CLIP).log().reshape(det.shape[0], -1)
    if mask is None:
        region = torch.ones_like(logd, dtype=torch.bool)
    else:
        m = _squeeze_labels(torch.as_tensor(mask, device=det.device))
        if tuple(m.shape[-det.dim() + 1:]) != tuple(det.shape[1:]):
            raise InputError(f"l2r_sdlogj: mask shape {tuple(m.shape)} does not match the field's grid {tuple(det.shape[1:])}")
        region = (m.expand_as(det)[inner] == 1).reshape(det.shape[0], -1)
    n = region.sum(1).double()
    mean = torch.where(region, logd, torch.zeros_like(logd)).sum(1) / n.clamp_min(1)
    var = (torch.where(region, logd - mean[:, None], torch.zeros_like(logd)) ** 2).sum(1) / n.clamp_min(1)
    return torch.where(n > 0, var.sqrt(), torch.full_like(n, float("nan")))


def l2r_absent(fixed: Tensor, moving: Tensor, labels: Sequence[int]) -> Tensor:
    """``(B, len(labels))`` bool: the label is missing from the fixed or the (unwarped) moving
    map, which the Learn2Reg evaluation scores as NaN for Dice and HD95."""
    f, m = _squeeze_labels(fixed), _squeeze_labels(moving)
    b, n = f.shape[0], len(labels)

    def present(x: Tensor) -> Tensor:
        cols = label_columns(x.reshape(b, -1), labels)
        offset = torch.arange(b, device=x.device).view(b, 1) * (n + 1)
        return torch.bincount((offset + cols).reshape(-1), minlength=b * (n + 1)).view(b, n + 1)[:, 1:] > 0

    return ~(present(f) & present(m))


def l2r_dice(warped: Tensor, fixed: Tensor, moving: Tensor, labels: Sequence[int]) -> Tensor:
    """The Learn2Reg challenge's per-label Dice ``(B, len(labels))``, float64: :func:`dice` of
    the warped moving and the fixed map, NaN where the label is absent from the fixed or the
    unwarped moving map (regkit's :func:`dice` is NaN only when absent from both compared maps)."""
    d = dice(warped, fixed, labels)
    return torch.where(l2r_absent(fixed, moving, labels).to(d.device), torch.full_like(d, float("nan")), d)
