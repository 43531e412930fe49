"""regkit-register end to end: raw scans on different grids and orientations registered without a
network (affine, then diffeomorphic), and with a network plus an affine stage and field-level
refinement. The whole transformation is one field: sampling the moving scan through its own
header at A_fixed (x + u(x)) gives warped.nii.gz."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

import regkit
from regkit.checkpoint import model_spec, save_checkpoint
from regkit.cli import register as register_cli
from regkit.data.synthetic import make_subject, make_template
from regkit.inference import register_files
from regkit.registration.tfm import read_itk_tfm, read_matrix_txt

SHAPE = (40, 44, 36)
# fixed: LIA, 1.2 mm; moving: RAS, 1.5 mm, another size (the same anatomy moved by a known affine)
FIXED_AFFINE = np.array([[-1.2, 0, 0, 24.0], [0, 0, 1.2, -21.0], [0, -1.2, 0, 26.0], [0, 0, 0, 1]])
QUICK = {"deformable.iterations": [30, 15], "deformable.levels": [4, 2]}


def _rotation(deg_z):
    c, s = np.cos(np.radians(deg_z)), np.sin(np.radians(deg_z))
    m = np.eye(4)
    m[:2, :2] = [[c, -s], [s, c]]
    return m


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    d = tmp_path_factory.mktemp("scans")
    gen = torch.Generator().manual_seed(3)
    template = make_template(SHAPE)
    fixed_img, fixed_lab = make_subject(template, gen, 3.0)
    moving_img, moving_lab = make_subject(template, gen, 3.0)
    # The moving subject lives in a world rotated by 8 degrees and shifted by (5, -4, 3) mm ...
    truth = _rotation(8.0)
    truth[:3, 3] = [5.0, -4.0, 3.0]  # p_moving = truth @ p_fixed
    a_m_native = truth @ FIXED_AFFINE
    # ... and is stored on a 1.5 mm RAS grid of another size that covers it
    new_shape = (34, 38, 32)
    corner = a_m_native @ np.array([0, 0, 0, 1.0])
    ras = np.diag([1.5, 1.5, 1.5, 1.0])
    extent = np.array([SHAPE]) - 1
    corners = np.array([[i, j, k, 1.0] for i in (0, extent[0, 0]) for j in (0, extent[0, 1]) for k in (0, extent[0, 2])])
    world = (a_m_native @ corners.T).T[:, :3]
    ras[:3, 3] = world.min(0) - 2.0
    del corner
    vox = np.linalg.inv(a_m_native) @ ras
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in new_shape], indexing="ij"), 0).reshape(3, -1)
    src = vox[:3, :3] @ grid + vox[:3, 3:]
    moving_ras = map_coordinates(moving_img.numpy(), src, order=1).reshape(new_shape).astype(np.float32)
    moving_lab_ras = map_coordinates(moving_lab.numpy(), src, order=0).reshape(new_shape).astype(np.int16)
    out = {"truth": truth}
    for name, data, aff in (("moving", moving_ras * 200, ras), ("fixed", fixed_img.numpy().astype(np.float32) * 200,
                                                                 FIXED_AFFINE),
                            ("moving_label", moving_lab_ras, ras), ("fixed_label", fixed_lab.numpy().astype(np.int16),
                                                                    FIXED_AFFINE)):
        img = nib.Nifti1Image(data, aff)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, str(d / f"{name}.nii.gz"))
        out[name] = d / f"{name}.nii.gz"
    return out


def _resample_through_header(moving_path, fixed_affine, flow_vox):
    """Independent of regkit: sample the moving scan at inv(A_m) A_f (x + u(x)) with SciPy."""
    mov = nib.load(str(moving_path))
    x = np.stack(np.meshgrid(*[np.arange(n) for n in flow_vox.shape[:3]], indexing="ij"), -1).astype(np.float64)
    pos = (x + flow_vox).reshape(-1, 3).T
    vox = np.linalg.inv(mov.affine) @ fixed_affine
    src = vox[:3, :3] @ pos + vox[:3, 3:]
    # grid-constant: zeros beyond the edge, interpolated towards them, as grid_sample's zero padding
    return map_coordinates(mov.get_fdata(), src, order=1, mode="grid-constant").reshape(flow_vox.shape[:3])


def test_register_raw_scans_without_a_network(tmp_path, scans):
    out = tmp_path / "out"
    r = register_files(None, scans["moving"], scans["fixed"], out, scans["moving_label"], scans["fixed_label"],
                       preset="fast", device="cpu", progress=False, preset_overrides=QUICK)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["warped.nii.gz", "flow_voxel.nii.gz", "flow_mm.nii.gz", "jacdet.nii.gz",
                            "warped_label.nii.gz", "affine.txt", "affine.tfm", "loss_curve.png", "register.json"])
    fixed = nib.load(str(scans["fixed"]))
    for name in names:
        if name.endswith(".nii.gz"):
            img = nib.load(str(out / name))
            assert np.array_equal(img.affine, fixed.affine) and img.shape[:3] == SHAPE, name
    # the affine: the known transform, from both files
    truth = scans["truth"]
    for matrix in (read_matrix_txt(out / "affine.txt"), read_itk_tfm(out / "affine.tfm")):
        brain = np.argwhere(nib.load(str(scans["fixed_label"])).get_fdata() > 0)
        pts = FIXED_AFFINE @ np.c_[brain, np.ones(len(brain))].T
        err = np.linalg.norm((matrix @ pts - truth @ pts)[:3], axis=0)
        assert err.mean() < 1.5, err.mean()  # mm; the deformations of the two subjects differ too
    # the whole transformation is the one field: warped.nii.gz from it, through the moving header
    u = nib.load(str(out / "flow_voxel.nii.gz")).get_fdata()[:, :, :, 0, :]
    warped = nib.load(str(out / "warped.nii.gz")).get_fdata()
    np.testing.assert_allclose(_resample_through_header(scans["moving"], fixed.affine, u), warped, atol=1e-3)
    u_mm = nib.load(str(out / "flow_mm.nii.gz")).get_fdata()[:, :, :, 0, :]
    np.testing.assert_allclose(u_mm, u @ FIXED_AFFINE[:3, :3].T, atol=1e-4)
    record = json.loads((out / "register.json").read_text())
    assert record["dice"] > record["dice_before"] + 0.1 and record["nonpos_jac_pct"] == 0.0
    kinds = [s["name"] for s in record["stages"]]
    assert kinds[0] == "affine" and "deformable" in kinds and record["preset"] == "fast"
    assert set(record["seconds_per_stage"]) >= {"affine", "deformable"} and r["warnings"] == []
    np.testing.assert_allclose(record["affine_matrix"], read_matrix_txt(out / "affine.txt"), atol=1e-9)


def test_command_line_without_a_checkpoint_and_its_errors(tmp_path, scans, capsys):
    args = [str(scans["moving"]), str(scans["fixed"]), "-o", str(tmp_path / "out"), "--preset", "affine",
            "--device", "cpu"]
    assert register_cli.main(args) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[:2] == ["affine.tfm", "affine.txt"]
    assert "inverse_flow_voxel.nii.gz" not in [p.name for p in (tmp_path / "out").iterdir()]
    for extra, message in ((["--preset", "acurate"], "Unknown registration preset 'acurate'. Did you mean 'accurate'?"),
                           (["--set", "deformable.iteration=[1]"], "Did you mean 'deformable.iterations'?"),
                           (["--refine", "5"], "refine and finetune_steps act on a network's prediction"),
                           (["--set", "deformable.loss=lncc_fst"], "Unknown loss 'lncc_fst'. Did you mean 'lncc_fast'?")):
        with pytest.raises(SystemExit) as exit_:
            register_cli.main([str(scans["moving"]), str(scans["fixed"]), "-o", str(tmp_path / "bad"), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "bad").exists()


def test_scans_that_do_not_overlap_are_refused(tmp_path, scans, capsys):
    far = tmp_path / "far.nii.gz"
    img = nib.load(str(scans["moving"]))
    affine = img.affine.copy()
    affine[:3, 3] += 800.0  # 80 cm away: no overlap without the centre-of-mass start
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), affine), str(far))
    with pytest.raises(SystemExit) as exit_:
        register_cli.main([str(far), str(scans["fixed"]), "-o", str(tmp_path / "out"), "--preset", "affine", "--set",
                           "init=none", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and err.startswith("regkit: error:") and "overlap" in err
    assert not (tmp_path / "out").exists()


def test_a_two_dimensional_scan_with_a_three_dimensional_one_is_refused(tmp_path, scans):
    flat = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(40, 44).astype(np.float32), np.eye(4)), str(flat))
    with pytest.raises(ValueError, match="slice.nii.gz is 2-D but .*fixed.nii.gz is 3-D") as err:
        register_files(None, flat, scans["fixed"], tmp_path / "out", device="cpu", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_two_dimensional_images_register_without_a_network(tmp_path, scans):
    # two subjects' middle slices: the same anatomy, deformed differently
    gen = torch.Generator().manual_seed(5)
    template = make_template((64, 72, 3))
    fixed, _ = make_subject(template, gen, 2.0)
    moving, _ = make_subject(template, gen, 2.0)
    fixed, moving = fixed[:, :, 1].numpy().astype(np.float32), moving[:, :, 1].numpy().astype(np.float32)
    for name, data in (("m", moving), ("f", fixed)):
        nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), str(tmp_path / f"{name}.nii.gz"))
    r = register_files(None, tmp_path / "m.nii.gz", tmp_path / "f.nii.gz", tmp_path / "out", preset="fast",
                       device="cpu", progress=False, preset_overrides={"deformable.levels": [2, 1],
                                                                       "deformable.iterations": [60, 30]})
    warped = nib.load(str(tmp_path / "out" / "warped.nii.gz")).get_fdata()
    assert warped.shape == (64, 72) and r["nonpos_jac_pct"] == 0.0
    assert np.abs(warped - fixed).mean() < 0.7 * np.abs(moving - fixed).mean()
    assert nib.load(str(tmp_path / "out" / "flow_voxel.nii.gz")).shape == (64, 72, 1, 1, 2)


def test_network_with_an_affine_stage_and_field_level_refinement(tmp_path, scans):
    torch.manual_seed(0)
    model = regkit.create_model("vxm1")  # untrained: near the identity, so refinement does the work
    ckpt = tmp_path / "net.ckpt"
    save_checkpoint(ckpt, {"model": model_spec(model), "state_dict": model.state_dict(), "epoch": 1, "config": {},
                           "data": {"normalize": "minmax", "shape": list(SHAPE), "intensity": [0.0, 1.0]}})
    plain = register_files(ckpt, scans["moving"], scans["fixed"], tmp_path / "plain", scans["moving_label"],
                           scans["fixed_label"], device="cpu", affine="affine", progress=False)
    refined = register_files(ckpt, scans["moving"], scans["fixed"], tmp_path / "refined", scans["moving_label"],
                             scans["fixed_label"], device="cpu", affine="affine", refine=15, progress=False)
    assert (tmp_path / "plain" / "affine.tfm").is_file() and plain["dice"] > plain["dice_before"]
    assert [s["name"] for s in refined["stages"]][-1] == "refine" and refined["stages"][-1]["iterations"] == 15
    assert refined["dice"] > plain["dice"] and refined["nonpos_jac_pct"] == 0.0
    u = nib.load(str(tmp_path / "refined" / "flow_voxel.nii.gz")).get_fdata()[:, :, :, 0, :]
    warped = nib.load(str(tmp_path / "refined" / "warped.nii.gz")).get_fdata()
    np.testing.assert_allclose(_resample_through_header(scans["moving"], FIXED_AFFINE, u), warped, atol=1e-3)
