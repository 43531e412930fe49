"""Pairs synthesised from label maps (regkit/data/synth.py, dataset=synth_labels): requested size
and dtypes, images that follow their label maps, any label set, seeded, clear refusals."""
import nibabel
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from regkit.data.synth import SynthLabelData, check_label_map, reorient, template_map
from regkit.data.synthetic import make_template
from regkit.errors import InputError, MissingFileError
from regkit.models import create_model
from tests.conftest import compose

SHAPE = (16, 18, 20)
FLAT = dict(blur=0.0, bias=0.0, gamma=0.0, std=(0.0, 0.0))  # each label one intensity


def blobs(values, shape=SHAPE, seed=0):
    """A label map with a block of each of ``values`` (and background)."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int32)
    for k, v in enumerate(values):
        x = 2 + (k % 3) * 4
        y = 2 + (k // 3) * 5
        lab[x:x + 4, y:y + 5, 3 + rng.integers(0, 4):15] = v
    return lab


def data(**kwargs):
    kwargs = {"shape": SHAPE, "template": 0.0, "shapes": 0.0, "length": 6, "validate": "none", **kwargs}
    return SynthLabelData(**kwargs).setup().datasets["train"]


def test_items_have_the_requested_size_dtype_and_range():
    ds = data(template=1.0, shapes=1.0, label_maps=[blobs([2, 3, 4])], length=9)
    groups = set()
    for i in range(len(ds)):
        item = ds[(0, i)]
        for key in ("moving", "fixed"):
            assert item[key].shape == (1, *SHAPE) and item[key].dtype == torch.float32
            assert float(item[key].min()) >= 0 and float(item[key].max()) <= 1
            assert item[f"{key}_label"].shape == (1, *SHAPE) and item[f"{key}_label"].dtype == torch.int64
        assert item["spacing"].dtype == torch.float64 and item["spacing"].shape == (3,)
        groups.add(item["id"].split(":")[0])
    assert groups == {"synth-template", "synth-shapes", "synth-maps"}


def test_images_follow_their_label_maps_with_any_label_set():
    # two maps with different label sets: 7 only in the first, 1000 only in the second
    maps = [blobs([2, 5, 7]), blobs([2, 5, 1000], seed=1)]
    for same in (False, True):
        ds = data(label_maps=maps, same_contrast=same, **FLAT)
        for i in range(len(ds)):
            item = ds[(1, i)]
            tables = []
            for key in ("moving", "fixed"):
                image, labels = item[key][0], item[f"{key}_label"][0]
                assert set(torch.unique(labels).tolist()) <= {0, 2, 5, 7, 1000}
                table = {}
                for v in torch.unique(labels).tolist():
                    values = image[labels == v]
                    assert float(values.max() - values.min()) < 1e-6  # one intensity per label
                    table[v] = float(values[0])
                tables.append(table)
            if same:  # one contrast draw for the pair: a label has one intensity in both images
                common = set(tables[0]) & set(tables[1])
                assert all(abs(tables[0][v] - tables[1][v]) < 1e-6 for v in common)
    # random shapes take the requested label values
    ds = data(shapes=1.0, shape_labels=[7, 100, 1000], **FLAT)
    item = ds[(0, 0)]
    assert set(torch.unique(item["moving_label"]).tolist()) <= {7, 100, 1000}
    assert len(torch.unique(item["moving_label"])) >= 2


def test_the_deformations_are_labels_moved_not_changed():
    lab = blobs([2, 3])
    item = data(label_maps=[lab], deform=3.0)[(0, 0)]
    for key in ("moving_label", "fixed_label"):
        moved = item[key][0].numpy()
        assert not np.array_equal(moved, lab)                       # deformed ...
        assert set(np.unique(moved)) <= {0, 2, 3}                   # ... by nearest neighbour
        for v in (2, 3):                                            # ... and smoothly: volumes kept within 30%
            assert abs((moved == v).sum() / (lab == v).sum() - 1) < 0.3
    still = data(label_maps=[lab], deform=0.0)[(0, 0)]
    assert np.array_equal(still["moving_label"][0].numpy(), lab)


def test_samples_are_a_function_of_seed_epoch_and_index():
    kwargs = dict(template=1.0, shapes=1.0, label_maps=[blobs([2, 3])])
    a, b = data(**kwargs), data(**kwargs)
    for key in ((0, 1), (3, 2)):
        x, y = a[key], b[key]
        for k in ("moving", "fixed", "moving_label", "fixed_label"):
            assert torch.equal(x[k], y[k])
    assert not torch.equal(a[(0, 1)]["moving"], a[(1, 1)]["moving"])
    assert not torch.equal(a[(0, 1)]["moving"], data(seed=1, **kwargs)[(0, 1)]["moving"])


def test_empty_and_non_integer_label_maps_are_refused(tmp_path):
    with pytest.raises(InputError, match="empty"):
        data(label_maps=[np.zeros(SHAPE, np.int32)])
    with pytest.raises(InputError, match="non-integer"):
        data(label_maps=[blobs([2]).astype(np.float32) + 0.5])
    with pytest.raises(InputError, match="integer label"):
        check_label_map(np.ones(SHAPE, bool), "mask")
    # files: the message names the file
    affine = np.eye(4)
    nibabel.save(nibabel.Nifti1Image(np.zeros(SHAPE, np.int16), affine), str(tmp_path / "empty.nii.gz"))
    nibabel.save(nibabel.Nifti1Image(blobs([2]).astype(np.float32) * 0.3, affine), str(tmp_path / "soft.nii.gz"))
    for name, words in (("empty.nii.gz", "empty"), ("soft.nii.gz", "non-integer")):
        with pytest.raises(InputError, match=f"{name}.*{words}"):
            data(label_maps=[str(tmp_path / name)])
    with pytest.raises(MissingFileError, match="no label map matches"):
        data(label_maps=[str(tmp_path / "nothing*.nii.gz")])
    with pytest.raises(InputError, match="no label maps to synthesise from"):
        data(label_maps=[])


def test_files_are_reoriented_and_fitted_to_the_grid(tmp_path):
    # a RAS map with a marker at the left-most, posterior, inferior corner of a 10x12x14 volume
    ras = np.zeros((10, 12, 14), np.int16)
    ras[:3, :2, :2] = 5
    nibabel.save(nibabel.Nifti1Image(ras, np.eye(4)), str(tmp_path / "ras.nii.gz"))
    lia = reorient(ras, "RAS", "LIA")
    assert lia.shape == (10, 14, 12)
    assert lia[-1, -1, 0] == 5 and lia[0, 0, -1] == 0  # left = high axis 0, inferior = high axis 1, posterior = low axis 2
    ds = data(label_maps=[str(tmp_path / "ras.nii.gz")], orientation="LIA", grid=(10, 14, 12), shape=(10, 14, 12),
              deform=0.0, **FLAT)
    assert np.array_equal(ds[(0, 0)]["moving_label"][0].numpy(), lia)
    # the template built in LIA is the RAS template reoriented
    assert np.array_equal(template_map((12, 16, 14), "LIA"), reorient(make_template((12, 14, 16)).numpy(), "RAS", "LIA"))


def test_the_config_group_composes_and_feeds_a_loss(tmp_path, data_dir):
    cfg = compose(["dataset=synth_labels", "dataset.shape=[16,16,16]", "dataset.length=2", "loss=dice",
                   "+loss.terms.grad.weight=1", "trainer.device=cpu"], output_dir=tmp_path, data_dir=data_dir)
    module = instantiate(cfg.dataset)
    batch = next(iter(module.train_dataloader()))
    assert batch["moving"].shape == (1, 1, 16, 16, 16)
    assert module.spec()["shape"] == [16, 16, 16] and module.spec()["normalize"] == "minmax"
    loss = instantiate(cfg.loss)
    out = create_model("vxm1")(batch["moving"], batch["fixed"])
    value = loss(out, batch)
    assert torch.isfinite(value.total) and 0 < float(value.terms["dice"]) <= 1
