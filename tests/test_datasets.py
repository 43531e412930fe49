"""dataset=ixi / pairs / learn2reg, file checks (affines, shapes, empty splits), the IXI pickle
converter, and label maps whose header disagrees with their image."""
import importlib.util
import json
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from regkit.data import IXIData, Learn2RegData, PairData, load_volume
from regkit.data.pairs import Pair
from regkit.metrics import IXI_LABELS, IXI_STRUCTURES
from tests.conftest import ROOT, compose

SHAPE = (8, 10, 12)
LIA = np.array([[-1.0, 0, 0, 80], [0, 0, 1, -112], [0, -1, 0, 96], [0, 0, 0, 1]])


def _save(path, data, affine=LIA):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def _volume(seed, label=False):
    rng = np.random.default_rng(seed)
    if label:
        return rng.choice([0, 2, 3, 41], size=SHAPE).astype(np.int16)
    return rng.random(SHAPE).astype(np.float32)


def _ixi_tree(root, splits=(("train", 3), ("val", 1))):
    _save(root / "atlas.nii.gz", _volume(0))
    _save(root / "atlas_label.nii.gz", _volume(0, True))
    for split, n in splits:
        for k in range(n):
            _save(root / split / "images" / f"subject_{k}.nii.gz", _volume(k + 1))
            _save(root / split / "labels" / f"subject_{k}.nii.gz", _volume(k + 1, True))
    return root


def test_ixi_layout_gives_atlas_to_subject_pairs(tmp_path):
    root = _ixi_tree(tmp_path / "ixi")
    data = IXIData(root, shape=SHAPE).setup()
    assert [p.id for p in data.pairs["train"]] == ["atlas->subject_0", "atlas->subject_1", "atlas->subject_2"]
    assert data.pairs["val"][0].moving == root / "atlas.nii.gz" and data.pairs["test"] == []
    assert data.eval_labels == list(IXI_LABELS) and data.label_groups == IXI_STRUCTURES
    item = data.datasets["val"][0]
    assert item["moving"].shape == (1, *SHAPE) and item["fixed_label"].dtype == torch.int64
    assert item["spacing"].tolist() == [1.0, 1.0, 1.0]
    flipped = IXIData(root, shape=SHAPE, direction="subject_to_atlas").setup()
    assert flipped.pairs["train"][0].fixed == root / "atlas.nii.gz"


def test_ixi_config_composes(tmp_path):
    root = _ixi_tree(tmp_path / "ixi")
    cfg = compose(["dataset=ixi", f"dataset.root={root}", "dataset.shape=[8,10,12]"], output_dir=tmp_path)
    data = instantiate(cfg.dataset).setup()
    assert len(data.pairs["train"]) == 3 and data.normalize == "none"


@pytest.mark.parametrize("problem,match", [
    ("no_label", "no label map for 1 image"),
    ("empty_val", "the val split is empty"),
    ("wrong_shape", r"subject_1.nii.gz: shape \(8, 10, 13\), expected \(8, 10, 12\)"),
    ("float_label", "label map has non-integer values"),
    ("nan", "contains 1 NaN/inf voxels"),
    ("no_root", "IXI dataset folder not found"),
])
def test_ixi_bad_inputs_name_the_file(tmp_path, problem, match):
    root = _ixi_tree(tmp_path / "ixi")
    if problem == "no_label":
        (root / "train" / "labels" / "subject_2.nii.gz").unlink()
    elif problem == "empty_val":
        (root / "val" / "images" / "subject_0.nii.gz").unlink()
    elif problem == "wrong_shape":
        _save(root / "train" / "images" / "subject_1.nii.gz", np.zeros((8, 10, 13), np.float32))
    elif problem == "float_label":
        _save(root / "train" / "labels" / "subject_0.nii.gz", np.full(SHAPE, 2.5, np.float32))
    elif problem == "nan":
        bad = _volume(5)
        bad[1, 1, 1] = np.nan
        _save(root / "val" / "images" / "subject_0.nii.gz", bad)
    elif problem == "no_root":
        root = tmp_path / "missing"
    with pytest.raises((ValueError, FileNotFoundError), match=match) as err:
        IXIData(root, shape=SHAPE).setup()
    assert "\n" not in str(err.value)


def test_label_affine_mismatch_names_both_files(tmp_path, caplog):
    img = _save(tmp_path / "img.nii.gz", _volume(1))
    lab = _save(tmp_path / "seg.nii.gz", _volume(1, True), affine=np.diag([0.98, 0.97, 1.0, 1.0]))
    pairs = [Pair(img, img, lab, _save(tmp_path / "seg_ok.nii.gz", _volume(2, True)), id="p")]
    with pytest.raises(ValueError) as err:
        PairData(train=pairs).setup()
    msg = str(err.value)
    assert f"label map {lab} and image {img} have different affines" in msg and "spacing [0.98, 0.97, 1.0]" in msg
    PairData(train=pairs, affine_check="warn").setup()
    assert "different affines" in caplog.text


def test_pairs_config_takes_csvs_from_the_command_line(tmp_path):
    for name in ("a", "b"):
        _save(tmp_path / f"{name}.nii.gz", _volume(ord(name)))
    csv = tmp_path / "pairs.csv"
    csv.write_text("moving,fixed\na.nii.gz,b.nii.gz\nb.nii.gz,a.nii.gz\n")
    cfg = compose(["dataset=pairs", f"dataset.train={csv}", f"dataset.val={csv}", "dataset.resize=[6,6,6]"],
                  output_dir=tmp_path)
    data = instantiate(cfg.dataset).setup()
    assert len(data.pairs["train"]) == 2 and [p.id for p in data.pairs["val"]] == ["a->b", "b->a"]
    item = data.datasets["train"][0]
    assert item["moving"].shape == (1, 6, 6, 6) and float(item["moving"].max()) <= 1.0
    assert item["spacing"].tolist() == pytest.approx([7 / 5, 9 / 5, 11 / 5])  # 1 mm voxels, corner-aligned resize
    spec = data.spec()
    assert spec["shape"] == [6, 6, 6] and spec["normalize"] == "minmax"
    with pytest.raises(Exception, match="train"):
        instantiate(compose(["dataset=pairs"], output_dir=tmp_path).dataset)


def test_csv_root_option(tmp_path):
    _save(tmp_path / "scans" / "a.nii.gz", _volume(1))
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "p.csv").write_text("moving,fixed\na.nii.gz,a.nii.gz\n")
    data = PairData(train=tmp_path / "lists" / "p.csv", root=tmp_path / "scans").setup()
    assert data.pairs["train"][0].moving == tmp_path / "scans" / "a.nii.gz"


def _l2r_tree(root, n=5):
    entries = []
    for k in range(n):
        _save(root / "imagesTr" / f"OASIS_{k:04d}_0000.nii.gz", _volume(k))
        _save(root / "labelsTr" / f"OASIS_{k:04d}_0000.nii.gz", _volume(k, True))
        entries.append({"image": f"./imagesTr/OASIS_{k:04d}_0000.nii.gz", "label": f"./labelsTr/OASIS_{k:04d}_0000.nii.gz"})
    spec = {"name": "OASIS", "training": entries, "training_paired_images": [],
            "registration_val": [{"fixed": entries[n - 2]["image"], "moving": entries[n - 1]["image"]}]}
    (root / "OASIS_dataset.json").write_text(json.dumps(spec))
    return root / "OASIS_dataset.json"


def test_learn2reg_json_pairs(tmp_path):
    path = _l2r_tree(tmp_path)
    data = Learn2RegData(path, train_pairing="all").setup()
    assert len(data.pairs["train"]) == 3 * 2  # images 0-2 (3 and 4 are the validation pair)
    val = data.pairs["val"][0]
    assert val.id == "OASIS_0004_0000->OASIS_0003_0000" and val.has_labels
    rnd = Learn2RegData(path, pairs_per_image=1, seed=3).setup()  # auto -> random (no paired list)
    assert len(rnd.pairs["train"]) == 3 and all(p.moving != p.fixed for p in rnd.pairs["train"])
    with pytest.raises(ValueError, match="'training_paired_images' is empty"):
        Learn2RegData(path, train_pairing="paired").setup()
    cfg = compose(["dataset=learn2reg", f"dataset.json={path}"], output_dir=tmp_path)
    assert len(instantiate(cfg.dataset).setup().pairs["val"]) == 1


def _converter():
    spec = importlib.util.spec_from_file_location("convert_ixi_pkl", ROOT / "scripts" / "convert_ixi_pkl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _release(src, shape=SHAPE):
    src.mkdir()
    originals = {}
    for name, folder in (("atlas", None), ("subject_1", "Train"), ("subject_2", "Train"), ("subject_7", "Val")):
        rng = np.random.default_rng(len(originals))
        pair = (rng.random(shape).astype(np.float32), rng.choice([0, 2, 41, 255], size=shape).astype(np.float32))
        folder_path = src / folder if folder else src
        folder_path.mkdir(exist_ok=True)
        with open(folder_path / f"{name}.pkl", "wb") as fh:
            pickle.dump(pair, fh)
        originals[name] = pair
    return originals


def test_convert_ixi_pkl_round_trip(tmp_path):
    conv = _converter()
    originals = _release(tmp_path / "IXI_data")
    out = tmp_path / "IXI_nifti"
    manifest = conv.convert(tmp_path / "IXI_data", out, expect_shape=None, progress=False)
    assert manifest["counts"] == {"train": 2, "val": 1, "test": 0} and manifest["label_values"] == [0, 2, 41, 255]
    image, label = originals["subject_7"]
    assert np.array_equal(load_volume(out / "val" / "images" / "subject_7.nii.gz").data, image)
    assert np.array_equal(load_volume(out / "val" / "labels" / "subject_7.nii.gz", np.int64, label=True).data, label)
    assert np.array_equal(load_volume(out / "atlas_label.nii.gz", np.int64).data, originals["atlas"][1])
    assert "2 train, 1 val, 0 test pairs" in conv.check(out, expect_shape=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["IXI_data", "IXI_nifti"]  # no partial folder left


def test_convert_rejects_bad_release_and_writes_nothing(tmp_path):
    conv = _converter()
    _release(tmp_path / "IXI_data")
    with pytest.raises(ValueError, match=r"atlas.pkl: shape \(8, 10, 12\), expected \(160, 192, 224\)"):
        conv.convert(tmp_path / "IXI_data", tmp_path / "out", progress=False)

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    with open(tmp_path / "IXI_data" / "Train" / "subject_2.pkl", "wb") as fh:
        pickle.dump(Evil(), fh)
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        conv.convert(tmp_path / "IXI_data", tmp_path / "out", expect_shape=None, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["IXI_data"]
