"""regkit-register (NIfTI in, NIfTI out) and regkit-evaluate on small generated data."""
import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import regkit
from regkit.evaluation import evaluate
from regkit.inference import register_files
from regkit.checkpoint import model_spec, save_checkpoint
from tests.conftest import ROOT

SHAPE = (24, 20, 28)
# an oblique-free LIA-style affine with 1.5 mm voxels along the second axis
FIXED_AFFINE = np.array([[-1.0, 0, 0, 20], [0, 0, 1.0, -14], [0, -1.5, 0, 15], [0, 0, 0, 1]])


def _blob(seed, shape=SHAPE):
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool3d(torch.randn(1, 1, *shape, generator=gen), 5, 1, 2)[0, 0]
    return x.numpy()


def _save(path, data, affine=FIXED_AFFINE, descrip=None):
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_xyzt_units("mm", "sec")
    if descrip:
        img.header["descrip"] = descrip
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    d = tmp_path_factory.mktemp("scans")
    out = {}
    for name, seed in (("moving", 1), ("fixed", 2)):
        b = _blob(seed)
        out[name] = _save(d / f"{name}.nii.gz", (b - b.min()).astype(np.float32) * 100, descrip=f"{name} scan")
        out[f"{name}_label"] = _save(d / f"{name}_seg.nii.gz", (np.digitize(b, [-0.05, 0.05]) * 2).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, scans):
    """An untrained VoxelMorph-1 (near-identity output) with a plain-data checkpoint whose config
    describes a pair-list dataset, as a trained run's would."""
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = regkit.create_model("vxm1")
    with torch.no_grad():  # a visible, smooth deformation instead of the near-zero initial one
        head = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)][-1]
        head.weight.normal_(0, 0.05)
        head.bias.copy_(torch.tensor([0.4, -0.3, 0.5]))
    pairs = d / "pairs.csv"
    pairs.write_text("id,moving,fixed,moving_label,fixed_label\n"
                     f"m->f,{scans['moving']},{scans['fixed']},{scans['moving_label']},{scans['fixed_label']}\n"
                     f"f->m,{scans['fixed']},{scans['moving']},{scans['fixed_label']},{scans['moving_label']}\n")
    config = {"dataset": {"_target_": "regkit.data.PairData", "train": str(pairs), "test": str(pairs),
                          "normalize": "minmax", "eval_labels": [2, 4], "resize": [16, 16, 16]}}
    path = d / "checkpoints" / "last.ckpt"
    save_checkpoint(path, {"model": model_spec(model), "state_dict": model.state_dict(), "epoch": 3,
                           "config": config, "data": {"normalize": "minmax", "shape": [16, 16, 16],
                                                      "eval_labels": [2, 4]}})
    return path


def test_register_outputs_keep_the_fixed_affine_and_header(tmp_path, scans, checkpoint):
    r = register_files(checkpoint, scans["moving"], scans["fixed"], tmp_path / "out", scans["moving_label"],
                       scans["fixed_label"], device="cpu")
    fixed = nib.load(str(scans["fixed"]))
    outputs = {}
    for name in ("warped", "flow_voxel", "flow_mm", "jacdet", "warped_label"):
        img = nib.load(str(tmp_path / "out" / f"{name}.nii.gz"))
        assert np.array_equal(img.affine, fixed.affine), name
        assert img.shape[:3] == SHAPE and img.header.get_xyzt_units() == ("mm", "sec")
        assert int(img.header["sform_code"]) == int(fixed.header["sform_code"])
        outputs[name] = np.asanyarray(img.dataobj)
    assert outputs["flow_voxel"].shape == (*SHAPE, 1, 3)
    assert nib.load(str(tmp_path / "out" / "flow_mm.nii.gz")).header.get_intent()[0] == "vector"
    u_vox, u_mm = outputs["flow_voxel"][:, :, :, 0].astype(np.float64), outputs["flow_mm"][:, :, :, 0]
    assert np.abs(u_vox).max() > 0.05  # a real deformation, not the identity
    np.testing.assert_allclose(u_mm, u_vox @ FIXED_AFFINE[:3, :3].T, atol=1e-5)
    # axis 0 runs right-to-left (-x), axis 2 runs anterior (+y), axis 1 inferior (-z) in 1.5 mm steps
    np.testing.assert_allclose(u_mm[..., 0], -u_vox[..., 0], atol=1e-5)
    np.testing.assert_allclose(u_mm[..., 2], -1.5 * u_vox[..., 1], atol=1e-5)
    assert set(np.unique(outputs["warped_label"])) <= {0, 2, 4}
    record = json.loads((tmp_path / "out" / "register.json").read_text())
    assert record["label_mode"] == "nearest" and record["network_shape"] == [16, 16, 16]
    assert record["labels"] == [2, 4] and 0 <= record["dice"] <= 1 and record["dice"] == r["dice"]
    assert any("training size" in n for n in record["notes"])


def test_register_moving_on_another_grid_is_resampled_through_the_affines(tmp_path, scans, checkpoint):
    # the moving scan on a coarser grid covering the same world box: 2x voxel size
    data = nib.load(str(scans["moving"])).get_fdata()[::2, ::2, ::2].astype(np.float32)
    coarse = FIXED_AFFINE.copy()
    coarse[:3, :3] *= 2
    coarse[:3, 3] += FIXED_AFFINE[:3, :3] @ np.full(3, 0.5)  # voxel centres of a 2x2x2 block
    moving = _save(tmp_path / "coarse.nii.gz", data, coarse)
    r = register_files(checkpoint, moving, scans["fixed"], tmp_path / "out", device="cpu")
    assert any("resampled onto the fixed grid" in n for n in r["notes"])
    assert nib.load(str(tmp_path / "out" / "warped.nii.gz")).shape == SHAPE
    with pytest.raises(ValueError, match="use --moving-grid world"):
        register_files(checkpoint, moving, scans["fixed"], tmp_path / "out2", moving_grid="voxel", device="cpu")


@pytest.mark.parametrize("case", ["label_affine", "unreadable", "label_shape", "reject"])
def test_register_bad_input_writes_nothing(tmp_path, scans, checkpoint, case):
    kwargs = dict(moving=scans["moving"], fixed=scans["fixed"], moving_label=scans["moving_label"])
    if case == "label_affine":
        kwargs["moving_label"] = _save(tmp_path / "seg.nii.gz", np.zeros(SHAPE, np.uint8), np.diag([0.98, 0.97, 1, 1]))
        match = f"label map {kwargs['moving_label']} and image {scans['moving']} have different affines"
    elif case == "unreadable":
        kwargs["moving"] = tmp_path / "broken.nii.gz"
        kwargs["moving"].write_bytes(b"not a nifti")
        match = "broken.nii.gz: cannot read"
    elif case == "label_shape":
        kwargs["moving_label"] = _save(tmp_path / "seg.nii.gz", np.zeros((4, 4, 4), np.uint8))
        match = r"has shape \(4, 4, 4\) but its image"
    else:
        kwargs["shape_policy"] = "reject"
        match = r"differs from the training shape \(16, 16, 16\)"
    with pytest.raises(ValueError, match=match) as err:
        register_files(checkpoint, out_dir=tmp_path / "out", device="cpu", **kwargs)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_register_command_line(tmp_path, scans, checkpoint):
    cmd = [sys.executable, str(ROOT / "scripts" / "register.py"), str(checkpoint), str(scans["moving"]),
           str(scans["fixed"]), "-o", str(tmp_path / "out"), "--shape-policy", "native", "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "network run at the input size" in res.stdout and "jacdet" in res.stdout
    res = subprocess.run(cmd[:3] + [str(tmp_path / "missing.nii.gz")] + cmd[4:], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == f"regkit: error: {tmp_path / 'missing.nii.gz'}: no such file"


@pytest.mark.parametrize("label_mode", ["nearest", "linear"])
def test_evaluate_writes_csv_and_summary(tmp_path, checkpoint, label_mode):
    res = evaluate(checkpoint, "test", tmp_path / "eval", label_mode=label_mode, device="cpu", progress=False)
    with open(res["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == ["m->f", "f->m"]
    for r in rows:
        assert r["label_mode"] == label_mode
        for key in ("dice_before", "dice", "dice_2", "dice_4", "hd95", "hd95_2", "nonpos_jac_pct", "sdlogj"):
            assert key in r and r[key] != "", key
        assert 0 <= float(r["dice"]) <= 1 and float(r["hd95"]) >= 0
    text = res["markdown"].read_text()
    assert f"label warping: **{label_mode}**" in text and "| Dice (mean over labels) |" in text
    assert "| 2 | Left-Cerebral-White-Matter |" in text
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["per_subject.csv", "summary.md"]


def test_validation_logs_jacobian_hd95_and_groups(tmp_path, data_dir):
    from regkit.experiment import train
    from tests.conftest import TINY_DATA, compose

    overrides = TINY_DATA + ["trainer.max_epochs=1", "~logger", "callbacks.validation.evaluator.hd95=true",
                             "+dataset.label_groups={wm:[2,41],cortex:[3,42]}"]
    metrics = train(compose(overrides, output_dir=tmp_path, data_dir=data_dir))
    assert 0 <= metrics["val/dice_groups"] <= 1 and 0 <= metrics["val/dice"] <= 1
    assert metrics["val/hd95"] > 0 and metrics["val/sdlogj"] >= 0 and 0 <= metrics["val/nonpos_jac_pct"] <= 100


def test_evaluate_at_full_resolution_and_from_a_csv(tmp_path, checkpoint):
    # the checkpoint's dataset resizes to 16³; resize=null evaluates on the 24×20×28 files, the
    # network still seeing its training size
    res = evaluate(checkpoint, "test", tmp_path / "full", overrides=["dataset.resize=null"], with_hd95=False,
                   device="cpu", progress=False)
    assert "evaluated at 24x20x28 (network at 16x16x16)" in res["markdown"].read_text()
    pairs = checkpoint.parent.parent / "pairs.csv"
    res = evaluate(checkpoint, out_dir=tmp_path / "csv", pairs_csv=pairs, with_hd95=False, device="cpu", progress=False, limit=1)
    assert len(res["rows"]) == 1 and res["rows"][0]["label_mode"] == "nearest"


@pytest.fixture(scope="module")
def checkpoint_with_loss(tmp_path_factory, checkpoint):
    """The same checkpoint, with the training loss a train.py run records (ncc + grad + dice)."""
    from regkit.checkpoint import load_checkpoint, to_plain
    from tests.conftest import compose

    data = load_checkpoint(checkpoint)
    loss = to_plain(compose(["loss=ncc", "+loss.terms.dice.weight=0.5"], output_dir="/tmp/x").loss)
    data["config"] = {**data["config"], "loss": loss}
    path = tmp_path_factory.mktemp("run_loss") / "with_loss.ckpt"
    save_checkpoint(path, data)
    return path


def test_register_instance_optimisation_lowers_the_loss_and_keeps_the_checkpoint(tmp_path, scans,
                                                                                 checkpoint_with_loss):
    before = checkpoint_with_loss.read_bytes()
    plain = register_files(checkpoint_with_loss, scans["moving"], scans["fixed"], tmp_path / "plain", device="cpu")
    tuned = register_files(checkpoint_with_loss, scans["moving"], scans["fixed"], tmp_path / "tuned", device="cpu",
                           finetune_steps=20, finetune_lr=1e-3, progress=False)
    f = tuned["finetune"]
    assert plain["finetune"] is None and f["steps"] == 20
    assert f["loss_final"] < f["loss_first"] - 1e-3, f
    assert f["terms_dropped"] == ["dice"]  # labels are never used to register
    assert checkpoint_with_loss.read_bytes() == before
    flow_plain = np.asanyarray(nib.load(str(tmp_path / "plain" / "flow_voxel.nii.gz")).dataobj)
    flow_tuned = np.asanyarray(nib.load(str(tmp_path / "tuned" / "flow_voxel.nii.gz")).dataobj)
    assert np.abs(flow_plain - flow_tuned).max() > 1e-3
    assert json.loads((tmp_path / "tuned" / "register.json").read_text())["finetune"]["steps"] == 20


@pytest.mark.parametrize("kwargs, match", [({"finetune_steps": -1}, "finetune_steps must be an integer >= 0"),
                                           ({"finetune_steps": 2, "finetune_lr": 0}, "finetune_lr must be > 0")])
def test_register_bad_finetune_options(tmp_path, scans, checkpoint_with_loss, kwargs, match):
    with pytest.raises(ValueError, match=match):
        register_files(checkpoint_with_loss, scans["moving"], scans["fixed"], tmp_path / "out", device="cpu", **kwargs)
    assert not (tmp_path / "out").exists()


def test_register_finetune_needs_the_training_loss(tmp_path, scans, checkpoint):
    with pytest.raises(ValueError, match="holds no loss config"):
        register_files(checkpoint, scans["moving"], scans["fixed"], tmp_path / "out", device="cpu", finetune_steps=2)
    assert not (tmp_path / "out").exists()
