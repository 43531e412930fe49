"""Metrics against hand-computed cases: Dice, the IXI grouping, Jacobian folding/SDlogJ, HD95."""
import math

import numpy as np
import pytest
import torch

from regkit.metrics import (FREESURFER_NAMES, IXI_LABELS, IXI_STRUCTURES, _surface, dice, group_scores, hd95,
                            jacobian_metrics, resolve_groups, resolve_labels)


def test_dice_hand_computed():
    a = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    b = torch.zeros_like(a)
    a[0, :2] = 1          # 32 voxels
    b[0, 1:3] = 1         # 32 voxels, 16 shared
    a[0, 3, 0, 0] = 7     # label 7 only in a
    d = dice(a, b, [1, 7, 9])
    assert d[0, 0] == 2 * 16 / 64 and d[0, 1] == 0.0 and math.isnan(d[0, 2])


def _dice_by_definition(p, t, labels):
    out = []
    for lab in labels:
        a, c = (p == lab), (t == lab)
        size = int(a.sum() + c.sum())
        out.append(2 * int((a & c).sum()) / size if size else math.nan)
    return out


# label ranges: FreeSurfer-like, negative values (searchsorted path), and a huge label value
DICE_CASES = [(0, 70, [2, 3, 4, 7, 8, 10, 99, 5, 0]), (-5, 70, [-3, 2, 3, 4, 0, 69]), (0, 70, [3, 2 ** 21])]


@pytest.mark.parametrize("low, high, labels, dtype", [
    (*case, dtype) for case in DICE_CASES for dtype in (torch.int64, torch.int32, torch.uint8)
    if not (dtype == torch.uint8 and case[0] < 0)])
def test_dice_one_pass_equals_the_definition(low, high, labels, dtype):
    g = torch.Generator().manual_seed(0)
    p = torch.randint(low, high, (3, 1, 9, 10, 11), generator=g)
    t = torch.randint(low, high, (3, 1, 9, 10, 11), generator=g)
    got = dice(p.to(dtype), t.to(dtype), labels)
    for b in range(3):
        want = _dice_by_definition(p[b], t[b], labels)
        assert np.allclose(got[b].numpy(), want, rtol=0, atol=1e-15, equal_nan=True)


def test_dice_rejects_repeated_labels():
    with pytest.raises(ValueError, match="distinct"):
        dice(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), [1, 1])


def test_ixi_grouping_is_the_published_17():
    assert len(IXI_LABELS) == 30 and len(IXI_STRUCTURES) == 17
    members = [m for ms in IXI_STRUCTURES.values() for m in ms]
    assert sorted(members) == sorted(IXI_LABELS) and len(set(members)) == 30
    singles = {name for name, ms in IXI_STRUCTURES.items() if len(ms) == 1}
    assert singles == {"Brain-Stem", "3rd-Ventricle", "4th-Ventricle", "CSF"}
    for name, ms in IXI_STRUCTURES.items():
        if len(ms) == 2:  # a left/right pair of one FreeSurfer structure
            left, right = FREESURFER_NAMES[ms[0]], FREESURFER_NAMES[ms[1]]
            assert left.startswith("Left-") and right.startswith("Right-")
            assert left[5:].lower() == right[6:].lower()
    assert resolve_labels("ixi") == IXI_LABELS and resolve_groups("ixi") == IXI_STRUCTURES
    with pytest.raises(ValueError, match="Unknown label set 'oasis'"):
        resolve_labels("oasis")


def test_group_scores_average_left_right():
    labels = [2, 41, 16, 3]
    per_label = torch.tensor([[0.8, 0.6, 0.9, float("nan")]], dtype=torch.float64)
    g = group_scores(per_label, labels, {"WM": (2, 41), "Stem": (16,), "Cortex": (3,)})
    assert torch.allclose(g[0, :2], torch.tensor([0.7, 0.9], dtype=torch.float64)) and math.isnan(g[0, 2])
    with pytest.raises(ValueError, match=r"labels \[42\] that are not among"):
        group_scores(per_label, labels, {"Cortex": (3, 42)})


def test_translation_has_jacobian_one_everywhere():
    flow = torch.zeros(1, 3, 6, 7, 8, dtype=torch.float64)
    flow[:, 0], flow[:, 1], flow[:, 2] = 2.5, -1.0, 0.25
    m = jacobian_metrics(flow)
    assert m["nonpos_jac_pct"].item() == 0.0 and m["sdlogj"].item() == 0.0


def test_known_fold_gives_known_count():
    d, h, w = 10, 5, 6
    flow = torch.zeros(1, 3, d, h, w, dtype=torch.float64)
    flow[:, 0, 4] = -3.0
    # central differences along axis 0: at x0 = 3, (u[4] - u[2]) / 2 = -1.5 -> det = -0.5 (folded);
    # at x0 = 5, (u[6] - u[4]) / 2 = +1.5 -> det 2.5; elsewhere det 1: one folded slab of h*w voxels.
    m = jacobian_metrics(flow)
    assert m["nonpos_jac_pct"].item() == pytest.approx(100.0 / d, abs=1e-12)
    # SDlogJ over the unfolded voxels: (d - 2) slabs with log 1 = 0 and one slab with log 2.5
    logs = np.array([0.0] * (d - 2) + [math.log(2.5)])
    assert m["sdlogj"].item() == pytest.approx(logs.std(), abs=1e-12)
    mask = torch.zeros(1, d, h, w, dtype=torch.bool)
    mask[:, :3] = True
    assert jacobian_metrics(flow, mask)["nonpos_jac_pct"].item() == 0.0


def test_sdlogj_of_a_quadratic_field():
    n, c = 12, 0.02
    x = torch.arange(n, dtype=torch.float64)
    flow = torch.zeros(1, 3, n, 3, 3, dtype=torch.float64)
    flow[:, 0] = (c * x ** 2).view(n, 1, 1)
    # d(x + c x^2)/dx: exact central differences inside (1 + 2 c x), one-sided at the two ends
    det = 1 + 2 * c * x.numpy()
    det[0], det[-1] = 1 + c, 1 + c * (2 * n - 3)
    assert jacobian_metrics(flow)["sdlogj"].item() == pytest.approx(np.log(det).std(), abs=1e-12)


def test_surface_of_a_cube():
    m = torch.zeros(5, 5, 5, dtype=torch.bool)
    m[1:4, 1:4, 1:4] = True
    assert _surface(m).sum() == 26  # all but the centre voxel
    assert _surface(torch.ones(4, 4, 4, dtype=torch.bool)).sum() == 64 - 8  # the array border is outside


def test_hd95_hand_computed_in_mm():
    a = torch.zeros(1, 9, 5, 6, dtype=torch.long)
    b = torch.zeros_like(a)
    a[0, 2] = 1   # one-voxel-thick planes, 3 voxels apart along axis 0
    b[0, 5] = 1
    assert hd95(a, b, [1], spacing=(2.0, 1.0, 1.0)).item() == pytest.approx(6.0, abs=1e-12)
    p = torch.zeros(1, 9, 9, 9, dtype=torch.long)
    q = torch.zeros_like(p)
    p[0, 1, 2, 3] = 4
    q[0, 5, 2, 6] = 4
    expect = math.hypot(4 * 0.5, 3 * 1.5)
    assert hd95(p, q, [4], spacing=(0.5, 1.0, 1.5)).item() == pytest.approx(expect, abs=1e-12)


def test_hd95_conventions_for_empty_structures():
    a = torch.zeros(1, 6, 6, 6, dtype=torch.long)
    b = torch.zeros_like(a)
    a[0, 1:3, 1:3, 1:3] = 1
    h = hd95(a, b, [1, 2])
    assert h[0, 0].item() == math.inf and math.isnan(h[0, 1].item())


def _brute_hd(a, b, spacing, q):
    s = torch.tensor(spacing, dtype=torch.float64)
    pa, pb = _surface(a).nonzero().double() * s, _surface(b).nonzero().double() * s
    dab, dba = torch.cdist(pa, pb).amin(1), torch.cdist(pb, pa).amin(1)
    return max(torch.quantile(dab, q).item(), torch.quantile(dba, q).item())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("percentile", [50, 95, 100])
def test_hd95_equals_brute_force(seed, percentile):
    gen = torch.Generator().manual_seed(seed)
    smooth = lambda: torch.nn.functional.avg_pool3d(torch.randn(1, 1, 18, 22, 16, generator=gen), 5, 1, 2)
    a, b = (smooth() > 0.05).long()[:, 0], (smooth() > 0.1).long()[:, 0]
    spacing = (1.5, 0.7, 2.0)
    got = hd95(a, b, [1], spacing, percentile=percentile).item()
    assert got == pytest.approx(_brute_hd(a[0] == 1, b[0] == 1, spacing, percentile / 100), abs=1e-9)


def test_hd95_far_apart_structures_widen_the_search():
    a = torch.zeros(1, 30, 30, 30, dtype=torch.long)
    b = torch.zeros_like(a)
    a[0, 1:3, 1:3, 1:3] = 1
    b[0, 25:28, 26:29, 20:22] = 1
    assert hd95(a, b, [1]).item() == pytest.approx(_brute_hd(a[0] == 1, b[0] == 1, (1, 1, 1), 0.95), abs=1e-9)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 0.7, 2.0)])
def test_hd95_equals_monai(spacing):
    """regkit's exact HD95 against MONAI's compute_hausdorff_distance (SciPy's Euclidean distance
    transform over face-connected surfaces, linear percentile): the same definition, so equal up to
    MONAI's float32 arithmetic (it returns float32 distances whatever the input; measured 4e-6
    relative), with several labels and an anisotropic voxel size."""
    pytest.importorskip("scipy")
    from monai.metrics import compute_hausdorff_distance

    gen = torch.Generator().manual_seed(7)
    noise = lambda: torch.nn.functional.avg_pool3d(torch.randn(1, 1, 20, 18, 22, generator=gen), 5, 1, 2)[:, 0]
    pred = torch.bucketize(noise(), torch.tensor([-0.1, 0.0, 0.1]))   # labels 0..3
    target = torch.bucketize(noise(), torch.tensor([-0.1, 0.0, 0.1]))
    labels = [1, 2, 3]
    ours = hd95(pred, target, labels, spacing)
    onehot = lambda x: torch.stack([(x == v) for v in [0] + labels], dim=1).double()
    ref = compute_hausdorff_distance(onehot(pred), onehot(target), include_background=False, percentile=95,
                                     spacing=list(spacing)).double()
    assert torch.allclose(ours, ref, rtol=1e-5, atol=0), (ours, ref)
