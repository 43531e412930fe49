"""regkit-prepare: a folder of raw scans (nii + mgz, different grids and orientations) becomes a
training set on the atlas grid with its pairs CSV; unreadable files are skipped in one line;
a second run keeps what is done."""
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from regkit.data import PairData, PairDataset, read_pairs_csv
from regkit.cli.prepare import main
from regkit.registration.prepare import find_subjects, prepare_dataset, read_subjects_csv
from regkit.registration.tfm import read_itk_tfm, read_matrix_txt
from regkit.registration.world import resample_world, transform_points, voxel_world_points

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_registration_affine import homogeneous, lia, phantom, ras, rotation  # noqa: E402

ATLAS_SHAPE = (30, 34, 28)
ATLAS_AFF = ras(2.0, ATLAS_SHAPE)
FAST = ["--config", str(ROOT / "configs" / "registration" / "affine.yaml"), "--no-progress", "--device", "cpu"]


def labels_of(image):
    """A label map that follows the anatomy: 0 background, 1 the head, 2 the bright blob."""
    return ((image > 0.05).astype(np.int16) + (image > 0.7)).astype(np.int16)


def write_scan(folder: Path, name: str, t_true, affine, shape, ext=".nii.gz", label=True):
    """The phantom moved by t_true (atlas world -> scan world) on the grid (affine, shape)."""
    img = phantom(transform_points(np.linalg.inv(t_true), voxel_world_points(affine, shape)))
    if ext == ".mgz":
        nib.save(nib.MGHImage(img, affine), str(folder / f"{name}.mgz"))
    else:
        nib.save(nib.Nifti1Image(img, affine), str(folder / f"{name}{ext}"))
    if label:
        nib.save(nib.Nifti1Image(labels_of(img), affine), str(folder / f"{name}_seg.nii.gz"))
    return img


@pytest.fixture()
def raw(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    truth = {
        "s1": homogeneous(rotation([5, -4, 7]), [3.0, -2.0, 1.0]),
        "s2": homogeneous(rotation([-6, 3, -5]) @ np.diag([1.05, 0.95, 1.0]), [-2.0, 1.5, 2.0]),
    }
    write_scan(folder, "s1", truth["s1"], lia(1.8, (34, 30, 36)), (34, 30, 36))                    # NIfTI, LIA
    write_scan(folder, "s2", truth["s2"], ras(2.4, (26, 30, 24)), (26, 30, 24), ext=".mgz")      # MGH, RAS
    (folder / "broken.nii.gz").write_bytes(b"not a nifti file")                                   # unreadable
    (folder / "orphan_seg.nii.gz").write_bytes(b"")                                               # a label, no scan
    (folder / "notes.txt").write_text("ignored")
    atlas = phantom(voxel_world_points(ATLAS_AFF, ATLAS_SHAPE))
    nib.save(nib.Nifti1Image(atlas, ATLAS_AFF), str(tmp_path / "atlas.nii.gz"))
    nib.save(nib.Nifti1Image(labels_of(atlas), ATLAS_AFF), str(tmp_path / "atlas_seg.nii.gz"))
    return folder, truth


def test_find_subjects_naming_rule(raw):
    folder, _ = raw
    subjects, notes = find_subjects(folder)
    assert [(s.name, s.image.name, s.label.name if s.label else None) for s in subjects] == [
        ("broken", "broken.nii.gz", None), ("s1", "s1.nii.gz", "s1_seg.nii.gz"), ("s2", "s2.mgz", "s2_seg.nii.gz")]
    assert len(notes) == 1 and "orphan_seg.nii.gz: label map without a scan named 'orphan'" in notes[0]


def test_prepare_writes_the_training_set(raw, tmp_path, capsys):
    folder, truth = raw
    out = tmp_path / "out"
    argv = [str(folder), "--atlas", str(tmp_path / "atlas.nii.gz"), "--atlas-label", str(tmp_path / "atlas_seg.nii.gz"),
            "-o", str(out), *FAST]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "2 aligned, 0 kept from before, 1 skipped; 2 pairs" in printed.out
    assert "skipped" in printed.err + printed.out and "broken.nii.gz: cannot read" in printed.err + printed.out

    atlas = nib.load(str(tmp_path / "atlas.nii.gz"))
    for name in ("s1", "s2"):
        img, lab = nib.load(str(out / "images" / f"{name}.nii.gz")), nib.load(str(out / "labels" / f"{name}.nii.gz"))
        for f in (img, lab):       # on the atlas grid, with its affine
            assert f.shape == ATLAS_SHAPE and np.allclose(f.affine, ATLAS_AFF)
        assert np.issubdtype(lab.get_data_dtype(), np.integer) and set(np.unique(lab.get_fdata())) <= {0, 1, 2}
        # aligned: the scan on the atlas grid matches the atlas, its labels the atlas's labels
        assert np.corrcoef(img.get_fdata().ravel(), atlas.get_fdata().ravel())[0, 1] > 0.99
        # the label map is the scan's, moved by nearest neighbour as the true transform moves it
        src = nib.load(str(folder / f"{name}_seg.nii.gz"))
        want = resample_world(torch.from_numpy(np.asarray(src.dataobj))[None, None], src.affine, ATLAS_AFF,
                              ATLAS_SHAPE, truth[name], mode="nearest")[0, 0].numpy()
        assert (np.asarray(lab.dataobj) == want).mean() > 0.995
        # the transforms: atlas world -> scan world, as text and as ITK .tfm
        m = read_matrix_txt(out / "transforms" / f"{name}.txt")
        assert np.allclose(read_itk_tfm(out / "transforms" / f"{name}.tfm"), m, atol=1e-9)
        pts = voxel_world_points(ATLAS_AFF, ATLAS_SHAPE)[atlas.get_fdata() > 0.05]
        err = np.linalg.norm(transform_points(m, pts) - transform_points(truth[name], pts), axis=1)
        assert err.mean() < 0.3, (name, err.mean())

    pairs = read_pairs_csv(out / "pairs.csv")
    assert [p.id for p in pairs] == ["atlas->s1", "atlas->s2"]
    assert pairs[0].moving == out / "atlas.nii.gz" and pairs[0].fixed == out / "images" / "s1.nii.gz"
    assert pairs[0].moving_label == out / "atlas_label.nii.gz" and pairs[1].fixed_label == out / "labels" / "s2.nii.gz"
    assert "," + str(out) not in (out / "pairs.csv").read_text()             # paths relative to the CSV
    item = PairDataset(pairs)[1]                                              # dataset=pairs reads it
    assert item["moving"].shape == (1, *ATLAS_SHAPE) and item["fixed_label"].shape == (1, *ATLAS_SHAPE)
    data = PairData(train=str(out / "pairs.csv"), validate="full")
    data.setup()
    assert len(data.datasets["train"]) == 2
    assert not list(out.rglob(".*"))                                          # no temporary files left

    # resumable: a second run keeps the done scans (files untouched), --overwrite redoes them
    stamp = os.stat(out / "images" / "s1.nii.gz").st_mtime_ns
    assert main(argv) == 0
    assert "0 aligned, 2 kept from before, 1 skipped" in capsys.readouterr().out
    assert os.stat(out / "images" / "s1.nii.gz").st_mtime_ns == stamp
    assert main(argv + ["--overwrite", "--pairs", "all"]) == 0
    assert "2 aligned, 0 kept from before, 1 skipped; 2 pairs" in capsys.readouterr().out
    assert os.stat(out / "images" / "s1.nii.gz").st_mtime_ns != stamp
    assert [p.id for p in read_pairs_csv(out / "pairs.csv")] == ["s1->s2", "s2->s1"]


def test_prepare_from_a_subject_csv(raw, tmp_path):
    folder, _ = raw
    (tmp_path / "list.csv").write_text("image,label,name\nraw/s2.mgz,raw/s2_seg.nii.gz,second\nraw/s1.nii.gz,,first\n")
    subjects = read_subjects_csv(tmp_path / "list.csv")
    assert [(s.name, s.label is not None) for s in subjects] == [("second", True), ("first", False)]
    summary = prepare_dataset(tmp_path / "out", tmp_path / "atlas.nii.gz", subjects_csv=tmp_path / "list.csv",
                              pairs="subject-to-atlas", progress=False)
    assert {k: v["status"] for k, v in summary["subjects"].items()} == {"second": "done", "first": "done"}
    pairs = read_pairs_csv(tmp_path / "out" / "pairs.csv")
    assert [p.id for p in pairs] == ["second->atlas", "first->atlas"] and not pairs[0].has_labels  # no atlas label
    assert not (tmp_path / "out" / "labels" / "first.nii.gz").exists()


@pytest.mark.parametrize("case, message", [
    ("no_atlas", "atlas.nii.gz: no such file"), ("no_folder", "nowhere: no such folder"),
    ("empty", "no scans found"), ("loss", "Unknown loss 'nccc'"),
])
def test_prepare_errors_are_one_line(tmp_path, raw, capsys, case, message):
    folder, _ = raw
    args = [str(folder), "--atlas", str(tmp_path / "atlas.nii.gz"), "-o", str(tmp_path / "out"), "--no-progress"]
    if case == "no_atlas":
        os.remove(tmp_path / "atlas.nii.gz")
    elif case == "no_folder":
        args[0] = str(tmp_path / "nowhere")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args[0] = str(tmp_path / "empty")
    elif case == "loss":
        args += ["--loss", "nccc"]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("regkit: error:")]
    assert e.value.code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out" / "pairs.csv").exists()


def test_prepare_script_exits_2_in_one_line(tmp_path):
    """scripts/prepare_dataset.py is the console command: a user error is one line and status 2."""
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_dataset.py"), str(tmp_path), "--atlas",
                          str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "out")], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == (
        f"regkit: error: {tmp_path / 'missing.nii.gz'}: no such file")
