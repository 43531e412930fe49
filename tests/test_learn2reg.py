"""Learn2Reg in and out: submission files in the challenge's convention (read back here as the
challenge's evaluation reads them), keypoints and TRE, the keypoint loss, the challenge's
metric variants, aggregation and ranking, and the command line. The challenge's reading and
metrics are re-implemented below from the facts in docs/learn2reg.md (SciPy, as the challenge)."""
import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from regkit.data import Learn2RegData
from regkit.data.keypoints import batch_keypoint_metrics, read_keypoint_pair, read_keypoints
from regkit.errors import InputError, MissingFileError
from regkit.cli.learn2reg import main
from regkit.learn2reg import (Case, Task, aggregate, case_ids, displacement_array, l2r_warp_labels,
                              rank_methods, read_displacement, score_submission, write_displacement,
                              write_submission, zero_predictor)
from regkit.losses import CompositeLoss, create_loss
from regkit.metrics import dice, jacobian_metrics, keypoint_metrics, l2r_absent, l2r_dice, l2r_sdlogj
from regkit.models import RegistrationOutput
from regkit.spatial import warp

ndi = pytest.importorskip("scipy.ndimage")


# -- the challenge's side, re-implemented from its documented behaviour ---------------------------
def challenge_read(path):
    """evaluation/utils.py load_disp: NIfTI -> get_fdata(); npz -> its one array as float32."""
    if str(path).endswith(".nii.gz"):
        return nib.load(str(path)).get_fdata()
    with np.load(path) as f:
        assert len(f.files) == 1
        return f[f.files[0]].astype(np.float32)


def challenge_warp(moving_seg, disp):
    """evaluation.py: map_coordinates(moving, identity + disp.transpose(3, 0, 1, 2), order=0)."""
    identity = np.meshgrid(*[np.arange(n) for n in moving_seg.shape], indexing="ij")
    return ndi.map_coordinates(moving_seg, identity + disp.transpose(3, 0, 1, 2), order=0)


def challenge_sdlogj(disp, mask=None):
    """utils.py jacobian_determinant (correlate with [-0.5, 0, 0.5], zero padding, crop 2), + 3,
    clip to [1e-9, 1e9], log, std (over mask[2:-2, ...] == 1 when masked)."""
    d = disp[None].transpose(0, 4, 1, 2, 3)
    kernel = np.array([-0.5, 0.0, 0.5])
    grads = [np.stack([ndi.correlate(d[:, c], kernel.reshape(shape), mode="constant", cval=0.0) for c in range(3)], 1)
             for shape in ((1, 3, 1, 1), (1, 1, 3, 1), (1, 1, 1, 3))]
    J = (np.concatenate(grads, 0) + np.eye(3).reshape(3, 3, 1, 1, 1))[:, :, 2:-2, 2:-2, 2:-2]
    det = (J[0, 0] * (J[1, 1] * J[2, 2] - J[1, 2] * J[2, 1]) - J[1, 0] * (J[0, 1] * J[2, 2] - J[0, 2] * J[2, 1])
           + J[2, 0] * (J[0, 1] * J[1, 2] - J[0, 2] * J[1, 1]))
    logd = np.log(np.clip(det + 3, 1e-9, 1e9))
    return logd.std() if mask is None else np.ma.MaskedArray(logd, 1 - mask[2:-2, 2:-2, 2:-2]).std()


def challenge_tre(fix_lms, mov_lms, disp, spacing_mov):
    """utils.py compute_tre: cubic-spline samples of disp at the fixed points (map_coordinates'
    default order 3), fixed + disp - moving, times the moving spacing, norm."""
    u = np.stack([ndi.map_coordinates(disp[..., k], fix_lms.T) for k in range(3)], 1)
    return np.linalg.norm((fix_lms + u - mov_lms) * np.asarray(spacing_mov), axis=1)


def challenge_2021_read(path):
    """The 2021 OASIS script: np.load(...)['arr_0'] (float16, (3, X/2, Y/2, Z/2)), float32, then
    zoom(disp[i], 2, order=2) per component -> (3, X, Y, Z)."""
    with np.load(path) as f:
        arr = f["arr_0"]
    assert arr.dtype == np.float16
    arr = arr.astype("float32")
    return np.array([ndi.zoom(arr[i], 2, order=2) for i in range(3)])


def translation(shape, t, dtype=torch.float64):
    return torch.tensor(t, dtype=dtype).view(1, 3, 1, 1, 1).expand(1, 3, *shape).contiguous()


def smooth_field(shape, scale=2.0, seed=0):
    rng = np.random.default_rng(seed)
    disp = ndi.gaussian_filter(rng.normal(0, scale, tuple(shape) + (3,)), (2, 2, 2, 0))
    return disp, torch.from_numpy(disp).permute(3, 0, 1, 2)[None].contiguous()


# -- a tiny Learn2Reg task folder ---------------------------------------------------------------
def _save(path, arr, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))


def _csv(path, points):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, points, fmt="%.3f", delimiter=",")


def synthetic_task(root, keypoints=(20, 30), shape=(12, 14, 16), shift=(2.0, -1.0, 1.0), seed=0):
    """Paired images as in the lung tasks: case k has TOY_000k_0000 (fixed) and TOY_000k_0001
    (moving), random images, labels 0..3, and keypoints[k] corresponding points, the moving ones
    the fixed ones moved by ``shift``. Every pair is a training and a validation pair."""
    rng = np.random.default_rng(seed)
    entries, pairs = [], []
    for k, n in enumerate(keypoints):
        points = rng.integers(2, min(shape) - 4, (n, 3)).astype(np.float64)
        for mod, kp in (("0000", points), ("0001", points + np.array(shift))):
            name = f"TOY_{k:04d}_{mod}"
            _save(root / "imagesTr" / f"{name}.nii.gz", rng.random(shape).astype(np.float32))
            _save(root / "labelsTr" / f"{name}.nii.gz", rng.integers(0, 4, shape).astype(np.int16))
            _csv(root / "keypointsTr" / f"{name}.csv", kp)
            entries.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz",
                            "keypoints": f"./keypointsTr/{name}.csv"})
        pairs.append({"fixed": entries[-2]["image"], "moving": entries[-1]["image"]})
    spec = {"name": "TOY", "tensorImageShape": {"0": list(shape)}, "training": entries,
            "training_paired_images": pairs, "registration_val": pairs}
    (root / "TOY_dataset.json").write_text(json.dumps(spec))
    return root / "TOY_dataset.json"


# -- names and layout ---------------------------------------------------------------------------
def test_displacement_file_names_follow_the_current_evaluation():
    oasis = Case(None, None, "./imagesTr/OASIS_0395_0000.nii.gz", "./imagesTr/OASIS_0396_0000.nii.gz")
    nlst = Case(None, None, "./imagesTr/NLST_0101_0000.nii.gz", "./imagesTr/NLST_0101_0001.nii.gz")
    # the short name is accepted only for fixed modality 0000 and moving 0001
    assert oasis.disp_stem() == "disp_0395_0000_0396_0000" and oasis.disp_stem("short") == "disp_0395_0396"
    assert nlst.disp_stem() == "disp_0101_0101" and nlst.disp_stem("long") == "disp_0101_0000_0101_0001"
    assert oasis.key == "0395_0000<--0396_0000" and case_ids("a/b/X_0007_0001.nii.gz") == ("0007", "0001")
    with pytest.raises(InputError, match=r"image_A\.nii\.gz: not a Learn2Reg image name") as err:
        case_ids("image_A.nii.gz")
    assert "\n" not in str(err.value)


def test_nifti_submission_is_xyz3_voxels_pulling_from_moving(tmp_path):
    shape, t = (10, 11, 12), (2.0, -1.0, 3.0)
    path = write_displacement(tmp_path / "disp.nii.gz", translation(shape, t), "nifti")
    img = nib.load(str(path))
    assert img.shape == shape + (3,) and img.get_data_dtype() == np.float32
    disp = challenge_read(path)
    for k in range(3):  # component k is the displacement along array axis k, in voxels, no flip
        assert np.all(disp[..., k] == t[k])
    # warping a label map: the challenge's map_coordinates equals regkit's warp (integer shift)
    labels = np.random.default_rng(1).integers(0, 5, shape)
    ours = warp(torch.from_numpy(labels)[None, None].double(), translation(shape, t), mode="nearest")[0, 0]
    assert np.array_equal(challenge_warp(labels.astype(float), disp), ours.numpy())
    # sign: a fixed voxel x reads the moving image at x + t
    assert challenge_warp(labels.astype(float), disp)[1, 3, 2] == labels[3, 2, 5]
    # and regkit reads the file back as the same flow
    assert torch.equal(read_displacement(path, shape), translation(shape, t))


def test_challenge_label_warp_matches_map_coordinates_on_any_field():
    shape = (14, 15, 16)
    disp, flow = smooth_field(shape, 3.0)
    labels = np.random.default_rng(2).integers(0, 6, shape)
    got = l2r_warp_labels(torch.from_numpy(labels)[None, None], flow)[0, 0].numpy()
    assert np.array_equal(got, challenge_warp(labels.astype(float), disp))
    # regkit's own nearest warp differs only on the border layer / exact halves (documented)
    ours = warp(torch.from_numpy(labels)[None, None].double(), flow, mode="nearest")[0, 0].numpy()
    inner = (slice(2, -2),) * 3
    assert (ours != got).sum() > 0 and (ours[inner] != got[inner]).mean() < 0.01


def test_npz_formats_round_trip(tmp_path):
    shape, t = (16, 18, 20), (2.5, -1.25, 3.0)  # representable in float16
    path = write_displacement(tmp_path / "disp.npz", translation(shape, t), "npz")
    disp = challenge_read(path)
    assert disp.shape == shape + (3,) and np.load(path)["arr_0"].dtype == np.float16
    assert all(np.all(disp[..., k] == t[k]) for k in range(3))
    # the 2021 OASIS half-resolution variant, read back as the 2021 script did
    half = write_displacement(tmp_path / "half.npz", translation(shape, t), "npz_half")
    assert np.load(half)["arr_0"].shape == (3, 8, 9, 10)
    up = challenge_2021_read(half)
    assert up.shape == (3,) + shape and all(np.all(up[k] == t[k]) for k in range(3))
    disp, flow = smooth_field(shape, 2.0)
    up = challenge_2021_read(write_displacement(tmp_path / "smooth.npz", flow, "npz_half"))
    err = np.abs(up - disp.transpose(3, 0, 1, 2))
    assert err.max() < 0.1 * np.abs(disp).max() and err.mean() < 0.02  # resolution loss of the format only
    with pytest.raises(InputError, match="even image sizes"):
        displacement_array(translation((15, 18, 20), t), "npz_half")


def test_wrong_displacements_are_refused_in_one_line(tmp_path):
    path = write_displacement(tmp_path / "disp.nii.gz", translation((10, 11, 12), (1, 0, 0)))
    with pytest.raises(InputError, match=r"disp.nii.gz: displacement of shape 10x11x12x3, expected 10x11x13x3") as e:
        read_displacement(path, (10, 11, 13))
    assert "\n" not in str(e.value)
    np.savez(tmp_path / "two.npz", np.zeros((2, 2, 2, 3)), np.zeros(1))
    with pytest.raises(InputError, match="exactly one array"):
        read_displacement(tmp_path / "two.npz")
    with pytest.raises(InputError, match=r"\(1, 3, X, Y, Z\)"):
        displacement_array(torch.zeros(1, 2, 4, 4))


# -- the challenge's metrics --------------------------------------------------------------------
def test_l2r_sdlogj_is_the_challenges_formula():
    shape = (14, 15, 16)
    disp, flow = smooth_field(shape, 3.0)
    assert abs(float(l2r_sdlogj(flow)[0]) - challenge_sdlogj(disp)) < 1e-13
    mask = np.zeros(shape)
    mask[3:11, 4:12, 2:14] = 1
    mask[5, 5, 5] = 2  # only mask == 1 counts in the challenge's masked array
    assert abs(float(l2r_sdlogj(flow, torch.from_numpy(mask))[0]) - challenge_sdlogj(disp, mask)) < 1e-13
    assert float(l2r_sdlogj(translation(shape, (1.5, 2, -3)))[0]) == 0.0
    # with folds: the +3 keeps every voxel, regkit's sdlogj drops folded ones and counts them
    fold = 4.0 * flow
    assert float(jacobian_metrics(fold)["nonpos_jac_pct"][0]) > 0
    assert abs(float(l2r_sdlogj(fold)[0]) - challenge_sdlogj(4.0 * disp)) < 1e-12


def test_l2r_dice_skips_labels_missing_from_fixed_or_moving():
    fixed = torch.tensor([[1, 1, 2, 0]]).view(1, 1, 1, 1, 4)
    moving = torch.tensor([[1, 3, 3, 0]]).view(1, 1, 1, 1, 4)
    warped = torch.tensor([[1, 2, 2, 3]]).view(1, 1, 1, 1, 4)
    ours, theirs = dice(warped, fixed, [1, 2, 3])[0], l2r_dice(warped, fixed, moving, [1, 2, 3])[0]
    assert ours[0] == theirs[0] == 2 / 3
    # label 2 is not in the moving map and label 3 not in the fixed one: the challenge skips both
    assert ours[1] == 2 * 1 / 3 and ours[2] == 0 and math.isnan(theirs[1]) and math.isnan(theirs[2])
    assert l2r_absent(fixed, moving, [1, 2, 3]).tolist() == [[False, True, True]]


def test_keypoint_metrics_and_the_challenges_tre():
    rng = np.random.default_rng(3)
    shape, t, spacing = (16, 17, 18), (1.5, -2.0, 0.5), (1.5, 1.0, 2.0)
    fixed = rng.integers(2, 14, (40, 3)).astype(np.float64)  # on voxel centres, as corrfield keypoints
    moving = fixed + np.array(t)
    m = keypoint_metrics(translation(shape, t), fixed, moving, spacing)
    expected = math.sqrt(sum((a * s) ** 2 for a, s in zip(t, spacing)))
    assert float(m["tre"][0]) < 1e-12 and abs(float(m["tre_initial"][0]) - expected) < 1e-12
    assert abs(float(keypoint_metrics(torch.zeros(1, 3, *shape), fixed, moving, spacing)["tre"][0]) - expected) < 1e-12
    disp, flow = smooth_field(shape, 2.0)  # any field: the cubic-spline challenge TRE at voxel centres
    moving = fixed + rng.normal(0, 2, fixed.shape)
    got = float(keypoint_metrics(flow, fixed, moving, spacing)["tre"][0])
    assert abs(got - challenge_tre(fixed, moving, disp, spacing).mean()) < 1e-12
    # padded batches: masked points do not count; a pair without points gives NaN
    fp = torch.from_numpy(np.stack([fixed, fixed]))
    mp = torch.from_numpy(np.stack([moving, moving + 100 * (np.arange(40) >= 30)[:, None]]))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:] = False
    two = keypoint_metrics(flow.expand(2, -1, -1, -1, -1), fp, mp, spacing, mask)["tre"]
    alone = keypoint_metrics(flow, fixed[:30], moving[:30], spacing)["tre"]
    assert abs(float(two[1]) - float(alone[0])) < 1e-12 and abs(float(two[0]) - got) < 1e-12
    assert math.isnan(float(keypoint_metrics(flow, fixed, moving, None, torch.zeros(1, 40, dtype=torch.bool))["tre"][0]))


def test_aggregate_quantiles_and_mean_rank_table():
    cases = {f"c{k}": {"DSC": d, "TRE": t} for k, (d, t) in enumerate([(0.5, 4.0), (0.7, 1.0), (0.6, 2.0), (0.9, 3.0)])}
    agg = aggregate(cases)
    assert agg["DSC"]["mean"] == pytest.approx(0.675) and agg["DSC"]["std"] == pytest.approx(np.std([.5, .7, .6, .9]))
    assert agg["DSC"]["30"] == pytest.approx(np.quantile([.5, .7, .6, .9], 0.3))  # robustness: low Dice
    assert agg["TRE"]["30"] == pytest.approx(np.quantile([4, 1, 2, 3], 0.7))      # robustness: high TRE
    methods = {"a": {"DSC": {"mean": 0.8, "30": 0.7}, "TRE": {"mean": 2.0, "30": 3.0}, "SDlogJ": {"mean": 0.1}},
               "b": {"DSC": {"mean": 0.8, "30": 0.6}, "TRE": {"mean": 1.0, "30": 2.0}, "SDlogJ": {"mean": 0.08}},
               "c": {"DSC": {"mean": 0.7, "30": 0.5}, "TRE": {"mean": 3.0, "30": float("nan")}, "SDlogJ": {"mean": 0.05}}}
    rows, markdown = rank_methods(methods)
    by = {r["method"]: r for r in rows}
    assert by["a"]["rank_DSC"] == by["b"]["rank_DSC"] == 1.5 and by["c"]["rank_TRE30"] == 3  # tie; NaN last
    assert by["a"]["mean_rank"] == pytest.approx((1.5 + 1 + 2 + 2 + 3) / 5)
    assert by["b"]["mean_rank"] == pytest.approx((1.5 + 2 + 1 + 1 + 2) / 5)
    assert [r["method"] for r in rows] == ["b", "a", "c"] and "| 1 | b |" in markdown
    with pytest.raises(InputError, match="share no ranked metric"):
        rank_methods({"a": {"X": {"mean": 1.0}}})


# -- keypoints in the data and the loss ---------------------------------------------------------
def test_keypoint_files_are_checked(tmp_path):
    _csv(tmp_path / "a.csv", np.ones((5, 3)))
    _csv(tmp_path / "b.csv", np.ones((4, 3)))
    assert read_keypoints(tmp_path / "a.csv").shape == (5, 3)
    with pytest.raises(InputError, match=r"fixed .*a\.csv has 5 points, moving .*b\.csv has 4") as e:
        read_keypoint_pair(tmp_path / "a.csv", tmp_path / "b.csv")
    assert "\n" not in str(e.value)
    with pytest.raises(MissingFileError, match=r"c\.csv: keypoint file not found"):
        read_keypoints(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("1,2,3\n4,5\n")
    with pytest.raises(InputError, match=r"d\.csv:2: expected 3 coordinates, got 2"):
        read_keypoints(tmp_path / "d.csv")


def test_learn2reg_data_batches_keypoints_of_different_lengths(tmp_path):
    path = synthetic_task(tmp_path, keypoints=(20, 30))
    data = Learn2RegData(path, batch_size=2, normalize="none").setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["fixed_keypoints"].shape == (2, 30, 3) and batch["keypoints_mask"].sum(1).tolist() in ([20, 30], [30, 20])
    assert torch.equal(batch["moving_spacing"], torch.ones(2, 3, dtype=torch.float64))
    # the known shift (2, -1, 1): TRE 0 with it, its length without it
    flow = translation((12, 14, 16), (2.0, -1.0, 1.0), torch.float32).expand(2, -1, -1, -1, -1)
    m = batch_keypoint_metrics(flow, batch)  # what validation reports
    assert torch.all(m["tre"] < 1e-5) and torch.allclose(m["tre_initial"], torch.full((2,), math.sqrt(6), dtype=torch.float64))
    # the loss term, through the composite, from the batch
    loss = CompositeLoss({"keypoints": {"weight": 1.0}})
    flow0 = torch.zeros(2, 3, 12, 14, 16, requires_grad=True)
    res = loss(RegistrationOutput(warped=batch["moving"], flow=flow0), batch)
    assert abs(res.terms["keypoints"].item() - math.sqrt(6)) < 1e-5
    res.total.backward()
    assert flow0.grad.abs().sum() > 0
    # resized data: keypoints follow the grid (align corners), TRE in mm is unchanged
    small = Learn2RegData(path, resize=(6, 7, 8), normalize="none").setup()
    item = small.datasets["val"][0]
    scale = torch.tensor([5 / 11, 6 / 13, 7 / 15], dtype=torch.float64)
    full = data.datasets["val"][0]
    assert torch.allclose(item["fixed_keypoints"][:20], full["fixed_keypoints"][:20] * scale)
    assert torch.allclose(item["moving_spacing"], 1 / scale)


def test_learn2reg_data_bad_keypoint_files(tmp_path):
    path = synthetic_task(tmp_path, keypoints=(20, 30))
    shutil.copy(tmp_path / "keypointsTr" / "TOY_0000_0001.csv", tmp_path / "keypointsTr" / "TOY_0001_0001.csv")
    # case 1: 30 fixed points, 20 moving ones
    with pytest.raises(InputError, match=r"keypoint files differ in length: fixed .*TOY_0001_0000\.csv has 30"):
        Learn2RegData(path).setup()
    (tmp_path / "keypointsTr" / "TOY_0001_0001.csv").unlink()
    with pytest.raises(MissingFileError, match=r"TOY_0001_0001\.csv: keypoint file not found"):
        Learn2RegData(path).setup()
    item = Learn2RegData(path, keypoints=False).setup().datasets["val"][0]
    assert "fixed_keypoints" not in item and batch_keypoint_metrics(torch.zeros(1, 3, 12, 14, 16), item) == {}


def test_keypoint_loss_values_penalties_and_bad_batches():
    shape, t = (10, 10, 10), torch.tensor([1.0, 2.0, 2.0])
    fixed = torch.tensor([[[2.0, 3.0, 4.0], [5.0, 5.0, 5.0], [0.0, 0.0, 0.0]]])
    moving = fixed + t
    mask = torch.tensor([[True, True, False]])
    flow = torch.zeros(1, 3, *shape, requires_grad=True)
    dist = create_loss("keypoints")(flow, fixed, moving, mask, torch.tensor([1.0, 1.0, 2.0]))
    assert abs(dist.item() - math.sqrt(1 + 4 + 16)) < 1e-6
    sq = create_loss("keypoints", penalty="squared")(flow, fixed, moving, mask)
    assert abs(sq.item() - 9.0) < 1e-5
    sq.backward()  # the gradient sits at the two valid points only, pointing along t
    g = flow.grad[0, :, 2, 3, 4]
    assert torch.allclose(g / g.norm(), -t / t.norm(), atol=1e-6) and float(flow.grad[0, :, 0, 0, 0].abs().sum()) == 0
    exact = translation(shape, tuple(t.tolist()), torch.float32).requires_grad_()
    zero = create_loss("keypoints")(exact, fixed, moving, mask)
    zero.backward()
    assert zero.item() < 1e-6 and torch.isfinite(exact.grad).all()
    with pytest.raises(InputError, match="needs keypoints, but the batch has no 'fixed_keypoints'"):
        CompositeLoss({"keypoints": {"weight": 1.0}})(RegistrationOutput(torch.zeros(1, 1, *shape), flow), {})
    with pytest.raises(InputError, match="penalty"):
        create_loss("keypoints", penalty="l3")


# -- submission, scoring and the command line on a synthetic task -------------------------------
def test_submission_scoring_and_cli_on_a_synthetic_task(tmp_path, capsys):
    path = synthetic_task(tmp_path / "task")
    t = (2.0, -1.0, 1.0)
    shift = lambda moving, fixed: translation(fixed.shape[2:], t, torch.float32)  # noqa: E731
    written = write_submission(path, shift, tmp_path / "sub", progress=False)
    assert [w["file"].name for w in written] == ["disp_0000_0000.nii.gz", "disp_0001_0001.nii.gz"]  # 0000 <- 0001
    result = score_submission(path, tmp_path / "sub", labels=[1, 2, 3], progress=False)
    case = result["cases"]["0000_0000<--0000_0001"]
    assert case["TRE"] < 1e-5 and abs(case["TRE_initial"] - math.sqrt(6)) < 1e-6
    assert abs(case["SDlogJ"]) < 1e-12 and case["nonpos_jac_pct"] == 0 and case["HD95"] > 0
    task = Task(path)
    c0 = task.cases("val")[0]
    fl = nib.load(str(c0.fixed_label)).get_fdata()
    ml = nib.load(str(c0.moving_label)).get_fdata()
    warped = challenge_warp(ml, challenge_read(written[0]["file"]))
    expected = np.nanmean([2 * ((fl == v) & (warped == v)).sum() / ((fl == v).sum() + (warped == v).sum()) for v in (1, 2, 3)])
    assert abs(case["DSC"] - expected) < 1e-12
    # a predictor that returns the wrong shape is refused with the pair and both shapes
    with pytest.raises(InputError, match=r"pair 0000_0000<--0000_0001: the predictor returned .*\(1, 3, 12, 14\)"):
        write_submission(path, lambda m, f: torch.zeros(1, 3, 12, 14), tmp_path / "bad", progress=False)
    # the command line: zero submission, score, rank
    assert main(["zero", str(path), str(tmp_path / "zero")]) == 0
    assert main(["score", str(path), str(tmp_path / "zero"), "--labels", "1-3", "--no-hd95"]) == 0
    assert main(["score", str(path), str(tmp_path / "sub"), "--labels", "1-3", "--no-hd95"]) == 0
    assert main(["rank", str(tmp_path / "zero" / "eval" / "metrics.json"), str(tmp_path / "sub" / "eval" / "metrics.json"),
                 "--out", str(tmp_path / "ranking.md")]) == 0
    ranking = (tmp_path / "ranking.md").read_text()
    assert ranking.index("| sub |") < ranking.index("| zero |")  # the right shift wins on TRE
    summary = (tmp_path / "zero" / "eval" / "summary.md").read_text()
    assert "| TRE | 2.4495 |" in summary and (tmp_path / "zero" / "eval" / "per_pair.csv").is_file()
    capsys.readouterr()


def test_bad_tasks_and_submissions_fail_in_one_line(tmp_path, capsys):
    path = synthetic_task(tmp_path / "task")
    spec = json.loads(path.read_text())
    spec["training"][1]["label"] = "./labelsTr/missing.nii.gz"
    path.write_text(json.dumps(spec))
    with pytest.raises(MissingFileError, match=r"missing\.nii\.gz: the 'label' file of \./imagesTr/TOY_0000_0001"):
        Task(path).cases("val")
    spec["registration_val"][0]["moving"] = "./imagesTr/TOY_0009_0001.nii.gz"
    path.write_text(json.dumps(spec))
    with pytest.raises(MissingFileError, match=r"TOY_0009_0001\.nii\.gz: image of 'registration_val' entry 0"):
        Task(path).cases("val")
    good = synthetic_task(tmp_path / "good")
    write_submission(good, zero_predictor, tmp_path / "sub", progress=False)
    (tmp_path / "sub" / "disp_0001_0001.nii.gz").unlink()
    with pytest.raises(MissingFileError, match=r"no displacement file for 1 of 2 pairs, e\.g\. disp_0001_0000_0001_0001"):
        score_submission(good, tmp_path / "sub", progress=False)
    # the command line prints the same as one line and exits with status 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["score", str(good), str(tmp_path / "sub")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("regkit: error: ") and "disp_0001_0000_0001_0001" in err[0]


# -- the labelled OASIS pair (real data) --------------------------------------------------------
@pytest.fixture(scope="module")
def oasis_task(real_data, tmp_path_factory):
    """The LapIRN OASIS pair as a tiny Learn2Reg task: fixed = image A (0001), moving = image B
    (0002), label 2 only (README: label 1 follows different protocols), keypoints from a known
    translation: 300 white-matter voxels of A, moved by T into B's frame."""
    src = real_data / "oasis_lapirn_160x192x144"
    root = tmp_path_factory.mktemp("oasis_task")
    files = {"imagesTr/OASIS_0001_0000.nii.gz": "image_A_160x192x144.nii.gz",
             "imagesTr/OASIS_0002_0000.nii.gz": "image_B_160x192x144.nii.gz",
             "labelsTr/OASIS_0001_0000.nii.gz": "image_A_160x192x144_seg_affinefixed.nii.gz",
             "labelsTr/OASIS_0002_0000.nii.gz": "image_B_160x192x144_seg.nii.gz"}
    for dst, name in files.items():
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        (root / dst).symlink_to(src / name)
    wm = np.argwhere(np.asanyarray(nib.load(str(src / files["labelsTr/OASIS_0001_0000.nii.gz"])).dataobj) == 2)
    fixed = wm[np.random.default_rng(0).choice(len(wm), 300, replace=False)].astype(np.float64)
    _csv(root / "keypointsTr" / "OASIS_0001_0000.csv", fixed)
    _csv(root / "keypointsTr" / "OASIS_0002_0000.csv", fixed + np.array(OASIS_T))
    entries = [{"image": f"./{k}", "label": "./" + k.replace("images", "labels")} for k in files if k.startswith("images")]
    pair = [{"fixed": entries[0]["image"], "moving": entries[1]["image"]}]
    spec = {"name": "OASIS", "tensorImageShape": {"0": [160, 192, 144]}, "training": entries,
            "training_paired_images": pair, "registration_val": pair}  # keypoints found beside imagesTr
    (root / "OASIS_dataset.json").write_text(json.dumps(spec))
    return root / "OASIS_dataset.json"


OASIS_T = (3.0, -2.0, 1.0)


@pytest.mark.realdata
def test_real_oasis_submission_files_and_scores(oasis_task, tmp_path):
    shift = lambda moving, fixed: translation(fixed.shape[2:], OASIS_T, torch.float32)  # noqa: E731
    written = write_submission(oasis_task, shift, tmp_path / "shift", progress=False)
    path = written[0]["file"]
    assert path.name == "disp_0001_0000_0002_0000.nii.gz"  # OASIS 0000/0000: the long name
    img = nib.load(str(path))
    assert img.shape == (160, 192, 144, 3) and img.get_data_dtype() == np.float32
    disp = challenge_read(path)
    assert all(np.all(disp[..., k] == OASIS_T[k]) for k in range(3))
    # the challenge's label warp of B's label 2 equals regkit's warp
    task = Task(oasis_task)
    case = task.cases("val")[0]
    moving_seg = nib.load(str(case.moving_label)).get_fdata()
    ours = warp(torch.from_numpy(moving_seg)[None, None], translation(moving_seg.shape, OASIS_T), mode="nearest")
    w = challenge_warp(moving_seg, disp)
    assert np.array_equal(w, ours[0, 0].numpy())
    # scores: the keypoints were built from the translation -> TRE 0 with it, |T| without it
    (s,) = score_submission(task, tmp_path / "shift", labels=[2], with_hd95=False, progress=False)["cases"].values()
    norm = math.sqrt(sum(v * v for v in OASIS_T))
    assert s["TRE"] < 1e-5 and abs(s["TRE_initial"] - norm) < 1e-6
    fixed_seg = nib.load(str(case.fixed_label)).get_fdata()
    assert abs(s["DSC"] - 2 * ((w == 2) & (fixed_seg == 2)).sum() / ((w == 2).sum() + (fixed_seg == 2).sum())) < 1e-12
    assert s["SDlogJ"] < 1e-12 and s["nonpos_jac_pct"] == 0
    before = l2r_dice(torch.from_numpy(moving_seg)[None], torch.from_numpy(fixed_seg)[None], torch.from_numpy(moving_seg)[None], [2])
    assert abs(float(before[0, 0]) - 0.767) < 0.0005  # the README's unregistered label-2 Dice
    # the dataset: validation batches carry the keypoints; the known translation gives TRE 0
    data = Learn2RegData(oasis_task, normalize="none", validate="header").setup()
    batch = next(iter(data.val_dataloader()))
    m = keypoint_metrics(translation((160, 192, 144), OASIS_T), batch["fixed_keypoints"], batch["moving_keypoints"],
                         batch["moving_spacing"], batch["keypoints_mask"])
    assert float(m["tre"][0]) < 1e-6 and abs(float(m["tre_initial"][0]) - norm) < 1e-6


@pytest.mark.realdata
def test_real_oasis_bad_displacement_shape(oasis_task, tmp_path):
    write_submission(oasis_task, zero_predictor, tmp_path / "sub", progress=False)
    wrong = tmp_path / "sub" / "disp_0001_0000_0002_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((160, 192, 143, 3), np.float32), np.eye(4)), str(wrong))
    with pytest.raises(InputError, match=r"disp_0001_0000_0002_0000\.nii\.gz: displacement of shape 160x192x143x3, "
                                         r"expected 160x192x144x3") as e:
        score_submission(oasis_task, tmp_path / "sub", labels=[2], with_hd95=False, progress=False)
    assert "\n" not in str(e.value)


def test_train_validate_evaluate_and_submit_a_keypoint_task(tmp_path, data_dir):
    """End to end on a toy keypoint task: validation logs TRE before and after, regkit-evaluate
    reports it per pair, and `regkit-learn2reg submit` writes the checkpoint's displacement files."""
    from regkit.evaluation import evaluate
    from regkit.experiment import train
    from tests.conftest import compose

    path = synthetic_task(tmp_path / "task", keypoints=(12, 9), shape=(16, 16, 16))
    cfg = compose(["dataset=learn2reg", f"dataset.json={path}", "dataset.normalize=minmax", "trainer.max_epochs=1",
                   "trainer.device=cpu", "~logger", "callbacks.progress.enabled=false",
                   "+loss.terms.keypoints.weight=0.1"], output_dir=tmp_path / "run", data_dir=data_dir)
    metrics = train(cfg)
    assert metrics["val/tre_before"] == pytest.approx(math.sqrt(6), rel=1e-6)  # the identity, both pairs
    assert 0 <= metrics["val/tre"] < 10
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    res = evaluate(ckpt, "val", tmp_path / "eval", with_hd95=False, device="cpu", progress=False)
    assert [r["tre_before"] for r in res["rows"]] == pytest.approx([math.sqrt(6)] * 2, rel=1e-6)
    assert "| keypoint TRE (mm) |" in res["text"]
    assert main(["submit", str(ckpt), str(path), str(tmp_path / "sub"), "--device", "cpu"]) == 0
    files = sorted(p.name for p in (tmp_path / "sub").iterdir())
    assert files == ["disp_0000_0000.nii.gz", "disp_0001_0001.nii.gz"]  # short names: modalities 0000 -> 0001
    disp = challenge_read(tmp_path / "sub" / files[0])
    assert disp.shape == (16, 16, 16, 3) and np.abs(disp).max() < 16
