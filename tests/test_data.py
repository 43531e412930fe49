"""NIfTI I/O, pair lists, the synthetic generator, and every bad input with its clear error."""
import gzip
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from regkit.data import (Pair, PairData, PairDataset, generate_synthetic, load_volume, read_pairs_csv,
                         save_nifti, synthetic_labels)
from regkit.data.synthetic import SyntheticData


def _nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def test_synthetic_is_seeded_and_brain_like(tmp_path):
    a = generate_synthetic(tmp_path / "a", shape=(40, 44, 48), n_train=2, n_val=1, n_test=0, seed=3, progress=False)
    b = generate_synthetic(tmp_path / "b", shape=(40, 44, 48), n_train=2, n_val=1, n_test=0, seed=3, progress=False)
    c = generate_synthetic(tmp_path / "c", shape=(40, 44, 48), n_train=2, n_val=1, n_test=0, seed=4, progress=False)
    img = lambda root: nib.load(str(root / "images" / "train_000.nii.gz")).get_fdata()
    assert np.array_equal(img(a), img(b)) and not np.array_equal(img(a), img(c))
    lab = nib.load(str(a / "labels" / "train_000.nii.gz")).get_fdata()
    assert lab.shape == (40, 44, 48)
    present = set(np.unique(lab).astype(int)) - {0}
    assert len(present) >= 15 and present <= set(synthetic_labels())
    # distinct structures have distinct mean intensities
    image = img(a)
    wm, cortex, ventricle = (image[lab == k].mean() for k in (2, 3, 4))
    assert ventricle + 0.1 < cortex and cortex + 0.1 < wm  # T1 contrast: CSF dark, white matter bright
    pairs = read_pairs_csv(a / "train_pairs.csv")
    assert len(pairs) == 2 and pairs[0].moving.name == "atlas.nii.gz" and pairs[0].has_labels


def test_synthetic_is_written_once(tmp_path):
    root = generate_synthetic(tmp_path / "s", shape=(20, 20, 20), n_train=1, n_val=0, n_test=0, progress=False)
    stamp = os.stat(root / "manifest.json").st_mtime_ns
    generate_synthetic(tmp_path / "s", shape=(20, 20, 20), n_train=1, n_val=0, n_test=0, progress=False)
    assert os.stat(root / "manifest.json").st_mtime_ns == stamp
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_synthetic_ixi_size_configurable(tmp_path):
    data = SyntheticData(tmp_path, shape=(160, 192, 224), n_train=1, n_val=0, n_test=0, validate="header")
    data.setup()
    item = data.datasets["train"][0]
    assert item["moving"].shape == (1, 160, 192, 224) and item["fixed_label"].dtype == torch.int64


def test_pair_dataset_items(tmp_path, monkeypatch):
    import regkit.data.pairs as pairs_module

    root = generate_synthetic(tmp_path, shape=(20, 22, 24), n_train=2, n_val=0, n_test=0, progress=False)
    reads = []
    real_load = pairs_module.load_volume
    monkeypatch.setattr(pairs_module, "load_volume", lambda path, *a, **k: reads.append(path) or real_load(path, *a, **k))
    ds = PairDataset(read_pairs_csv(root / "train_pairs.csv"), normalize="minmax", cache=True)
    first = ds[0]
    item = ds[1]
    assert item["moving"].shape == (1, 20, 22, 24) and item["moving"].dtype == torch.float32
    assert float(item["fixed"].min()) == 0.0 and float(item["fixed"].max()) == 1.0
    assert item["id"] == "atlas->train_001"
    # both pairs share the atlas: with the cache, its image and label map are read once, and
    # reading the pairs again reads nothing
    assert len(reads) == len(set(reads)) == 6  # atlas image and label, two subjects' images and labels
    again = ds[0]
    assert len(reads) == 6 and torch.equal(again["moving"], first["moving"])


@pytest.mark.parametrize("kind", ["missing", "garbage", "nan", "not3d", "float_labels"])
def test_load_volume_bad_input(tmp_path, kind):
    path = tmp_path / f"{kind}.nii.gz"
    if kind == "garbage":
        path.write_bytes(gzip.compress(b"this is not a nifti file"))
    elif kind == "nan":
        data = np.ones((4, 4, 4), np.float32)
        data[1, 2, 3] = np.nan
        _nifti(path, data)
    elif kind == "not3d":
        _nifti(path, np.ones((4, 4), np.float32))
    elif kind == "float_labels":
        _nifti(path, np.full((4, 4, 4), 1.5, np.float32))
    expected = {"missing": (FileNotFoundError, "no such file"), "garbage": (ValueError, "cannot read"),
                "nan": (ValueError, "1 NaN/inf voxels"), "not3d": (ValueError, "expected a 3-D volume"),
                "float_labels": (ValueError, "non-integer values")}[kind]
    with pytest.raises(expected[0], match=expected[1]) as err:
        load_volume(path, label=kind == "float_labels")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_pairs_csv_missing_column(tmp_path):
    (tmp_path / "p.csv").write_text("moving,target\na.nii.gz,b.nii.gz\n")
    with pytest.raises(ValueError, match=r"p.csv: missing column 'fixed'"):
        read_pairs_csv(tmp_path / "p.csv")


def test_data_checks_report_files_before_training(tmp_path):
    a = _nifti(tmp_path / "a.nii.gz", np.zeros((8, 8, 8), np.float32))
    b = _nifti(tmp_path / "b.nii.gz", np.zeros((8, 8, 9), np.float32))
    bad = np.zeros((8, 8, 8), np.float32)
    bad[0, 0, 0] = np.inf
    c = _nifti(tmp_path / "c.nii.gz", bad)
    data = PairData(train=[Pair(a, b, id="ab"), Pair(a, c, id="ac"), Pair(a, tmp_path / "gone.nii.gz", id="ag")])
    with pytest.raises(ValueError) as err:
        data.setup()
    msg = str(err.value)
    assert "3 problem(s)" in msg and "gone.nii.gz: no such file" in msg
    assert "c.nii.gz: contains 1 NaN/inf" in msg and "b.nii.gz has shape (8, 8, 9)" in msg


def test_empty_training_split(tmp_path):
    (tmp_path / "p.csv").write_text("moving,fixed\n")
    with pytest.raises(ValueError, match="training split is empty"):
        PairData(train=tmp_path / "p.csv").setup()


def test_save_nifti_is_atomic(tmp_path, monkeypatch):
    dest = tmp_path / "out.nii.gz"
    save_nifti(dest, np.ones((3, 3, 3), np.float32), np.diag([2, 2, 2, 1]))
    assert nib.load(str(dest)).header.get_zooms() == (2, 2, 2)

    def boom(img, filename):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_nifti(tmp_path / "new.nii.gz", np.ones((3, 3, 3), np.float32), np.eye(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]
