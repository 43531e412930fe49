"""Augmentation of training pairs (regkit/data/augment.py, the augment= config group): labels stay
on their images, the geometry is the documented one, draws come from the sample's generator only,
and augment=none changes nothing."""
import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from monai.transforms import AdjustContrast

from regkit.data import Learn2RegData
from regkit.data.augment import PairAugmentation, adjust_gamma, affine_matrix, sampling_positions
from regkit.data.keypoints import KeypointPairDataset
from regkit.data.pairs import sample_generator
from regkit.errors import InputError
from regkit.experiment import build
from regkit.spatial import sample_at
from regkit.training.loggers import Logger
from tests.conftest import TINY_DATA, compose
from tests.test_learn2reg import synthetic_task

STRONG = dict(rotate=10.0, scale=0.1, shear=0.05, translate=4.0, elastic=3.0, flip_axes=[0], gamma=0.3, contrast=0.3,
              bias=0.3, noise=0.05)


def block_pair(shape=(20, 22, 24), seed=0):
    """A pair whose images are a function of their label maps (lut[label]): blocks of labels 0..5
    inside a background margin (what lies outside the volume is background too)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(1, 6, (1, 1, 3, 3, 3), generator=g).float()
    inner = [s - 8 for s in shape]
    labels = torch.nn.functional.pad(torch.nn.functional.interpolate(coarse, size=inner, mode="nearest"), [4] * 6)[0].long()
    lut = torch.tensor([0.0, 0.2, 0.35, 0.5, 0.7, 0.9])
    fixed_labels = torch.roll(labels, 3, dims=1)
    return {"moving": lut[labels], "fixed": lut[fixed_labels], "moving_label": labels, "fixed_label": fixed_labels,
            "spacing": torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64), "id": "blocks"}, lut


def test_none_and_the_default_object_leave_items_bitwise_unchanged(tmp_path, data_dir):
    cfg = compose(TINY_DATA + ["augment=none"], output_dir=tmp_path, data_dir=data_dir)
    none = instantiate(cfg.augment)
    item = block_pair()[0]
    assert not none.enabled and none(item, torch.Generator()) is item
    # through the dataset: the training items under augment=none equal the stored pairs, bitwise
    data = instantiate(cfg.dataset)
    assert isinstance(data.transform, PairAugmentation) and not data.transform.enabled
    ds = data.setup().datasets["train"]
    for i in range(len(ds)):
        got, stored = ds[(0, i)], ds.load(i)
        for key in ("moving", "fixed", "moving_label", "fixed_label"):
            assert torch.equal(got[key], stored[key])
    # and the light/strong configs do change them
    light = instantiate(compose(["augment=light"]).augment)
    assert light.enabled and not torch.equal(light(ds.load(0), sample_generator(0, 0, 0))["moving"], ds.load(0)["moving"])


def interior(labels):
    """Voxels whose 26 neighbours all carry their label (where linear interpolation of lut[label]
    must give exactly the label's value); the outer layer has unknown neighbours and is left out."""
    lab = labels[0].float()[None, None]
    same = (torch.nn.functional.max_pool3d(lab, 3, 1, 1) == -torch.nn.functional.max_pool3d(-lab, 3, 1, 1))[0, 0]
    inner = torch.zeros_like(same)
    inner[1:-1, 1:-1, 1:-1] = True
    return same & inner


def test_labels_stay_aligned_with_their_images():
    item, lut = block_pair()
    spatial = PairAugmentation(rotate=10, scale=0.1, shear=0.05, translate=4, elastic=3, flip_axes=[0], flip_prob=1.0)
    out = spatial(item, sample_generator(0, 1, 2))
    for key in ("moving", "fixed"):
        assert out[key].shape == item[key].shape and out[f"{key}_label"].dtype == torch.int64
        inside = interior(out[f"{key}_label"])
        assert inside.float().mean() > 0.2
        error = (out[key][0] - lut[out[f"{key}_label"][0]]).abs()
        # away from boundaries the interpolated image is its label's value: image and labels moved together
        assert float(error[inside].max()) < 1e-5
        # the control: labels moved by another draw do not fit the image
        other = spatial(item, sample_generator(0, 1, 3))[f"{key}_label"]
        assert float((out[key][0] - lut[other[0]]).abs()[interior(other)].max()) > 0.1
    # a (near-)identity affine and flips move image and labels by whole voxels: agreement everywhere
    whole = {**item, "spacing": torch.ones(3, dtype=torch.float64)}
    shifted = PairAugmentation(translate=1e-9, flip_axes=[0, 2], flip_prob=1.0)(whole, sample_generator(0, 0, 0))
    for key in ("moving", "fixed"):
        assert torch.allclose(shifted[key], lut[shifted[f"{key}_label"]], rtol=0, atol=1e-5)
        assert torch.equal(shifted[f"{key}_label"], item[f"{key}_label"].flip(1, 3))


def test_same_seed_same_pair_other_seed_other_pair():
    item, _ = block_pair()
    aug = PairAugmentation(**STRONG)
    a = aug(item, sample_generator(7, 3, 1))
    b = aug(item, sample_generator(7, 3, 1))
    c = aug(item, sample_generator(7, 3, 2))
    for key in ("moving", "fixed", "moving_label", "fixed_label"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["moving"], c["moving"])
    # moving and fixed get independent spatial draws: the same image twice comes out different
    twin = {**item, "fixed": item["moving"].clone(), "fixed_label": item["moving_label"].clone()}
    out = PairAugmentation(rotate=10)(twin, sample_generator(0, 0, 0))
    assert not torch.equal(out["moving"], out["fixed"])
    # the input is not modified
    assert torch.equal(item["moving"], block_pair()[0]["moving"])


def test_sampling_positions_are_the_documented_world_map():
    # y = c + D^-1 (M D (x - c) + t), checked at a few voxels with NumPy
    shape, spacing = (9, 11, 13), (1.0, 1.5, 2.0)
    m = affine_matrix([0.2, -0.1, 0.3], [1.1, 0.9, 1.05], [0.05, -0.02, 0.03])
    t = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    pos = sampling_positions(shape, m, t, spacing, dtype=torch.float64)
    c, d = (np.array(shape) - 1) / 2, np.diag(spacing)
    for x in ([0, 0, 0], [4, 5, 6], [8, 10, 12], [2, 9, 3]):
        want = c + np.linalg.inv(d) @ (m.numpy() @ d @ (np.array(x) - c) + t.numpy())
        assert np.allclose(pos[0, :, x[0], x[1], x[2]].numpy(), want, atol=1e-12)
    # +90 degrees about axis 2 reads input[c0 - (x1 - c1), c1 + (x0 - c0)] at output voxel x: torch.rot90 from axis 1 to 0
    cube = torch.rand(1, 1, 7, 7, 5, dtype=torch.float64)
    pos = sampling_positions((7, 7, 5), affine_matrix([0, 0, math.pi / 2], [1, 1, 1], [0, 0, 0]),
                             torch.zeros(3, dtype=torch.float64), (1, 1, 1), dtype=torch.float64)
    rotated = sample_at(cube, pos)
    assert torch.allclose(rotated, torch.rot90(cube, 1, dims=(3, 2)), atol=1e-12)


def test_gamma_is_monais_adjust_contrast():
    x = torch.rand(1, 10, 11, 12, dtype=torch.float64) * 3 + 0.5
    for gamma in (0.6, 1.0, 1.7):
        ours = adjust_gamma(x, gamma)
        monai = torch.as_tensor(AdjustContrast(gamma)(x))  # MONAI adds 1e-7 to the range
        assert torch.allclose(ours, monai, rtol=0, atol=1e-5)
        assert abs(float(ours.min()) - float(x.min())) < 1e-12 and abs(float(ours.max()) - float(x.max())) < 1e-9


def test_bad_options_are_refused_with_the_value():
    for kwargs, words in ((dict(rotate=-1), "rotate"), (dict(rotate=200), "degrees"), (dict(scale=1.5), "scale"),
                          (dict(flip_prob=2), "flip_prob"), (dict(flip_axes=[0, 0]), "flip_axes"),
                          (dict(noise=float("nan")), "noise"), (dict(elastic_points=1), "elastic_points")):
        with pytest.raises(InputError, match=words):
            PairAugmentation(**kwargs)
    with pytest.raises(InputError, match="do not exist"):
        PairAugmentation(flip_axes=[3])(block_pair()[0], torch.Generator())


def test_loader_workers_do_not_change_the_augmented_batches(tmp_path, data_dir):
    def batches(workers):
        cfg = compose(TINY_DATA + ["augment=strong", f"dataset.num_workers={workers}", "dataset.batch_size=2",
                                   "dataset.shape=[16,16,16]", "dataset.n_train=4"], output_dir=tmp_path, data_dir=data_dir)
        loader = instantiate(cfg.dataset).train_dataloader()
        loader.sampler.set_epoch(1)
        return [b["moving"] for b in loader]

    for a, b in zip(batches(0), batches(2)):
        assert torch.equal(a, b)


def test_spatial_augmentation_on_keypoint_pairs_is_refused(tmp_path):
    path = synthetic_task(tmp_path)
    with pytest.raises(InputError, match="keypoints would not move"):
        Learn2RegData(path, normalize="none", transform=PairAugmentation(rotate=5)).setup()
    # intensity-only augmentation is fine there: keypoints still correspond
    data = Learn2RegData(path, normalize="none", transform=PairAugmentation(gamma=0.2, noise=0.02)).setup()
    assert isinstance(data.datasets["train"], KeypointPairDataset)
    item = data.datasets["train"][(0, 0)]
    assert item["keypoints_mask"].any() and not torch.equal(item["moving"], data.datasets["train"].base.load(0)["moving"])



class Images(Logger):
    """Records the pictures a run logs."""

    def __init__(self):
        self.images = []

    def log_scalars(self, scalars, step):
        pass

    def log_image(self, tag, image, step):
        self.images.append((tag, image, step))


@pytest.mark.parametrize("augment, logged", [("light", True), ("none", False)])
def test_the_augmentation_picture_is_logged_once(tmp_path, data_dir, augment, logged):
    cfg = compose(TINY_DATA + [f"augment={augment}", "dataset.shape=[16,16,16]", "dataset.n_train=2",
                               "trainer.max_epochs=2", "callbacks.validation.log_images=false"],
                  output_dir=tmp_path, data_dir=data_dir)
    parts = build(cfg)
    trainer = parts["trainer"]
    trainer.logger = Images()
    trainer.fit(parts["model"], parts["loss"], parts["optimizer"], parts["data"])
    pictures = [(image, step) for tag, image, step in trainer.logger.images if tag == "data/augmentation"]
    assert len(pictures) == (1 if logged else 0)
    if logged:
        image, step = pictures[0]
        # 2 pairs (rows) x 4 panels (moving, fixed as loaded; moving, fixed as trained), RGB in [0, 1]
        assert step == 0 and image.ndim == 3 and image.shape[2] == 3 and image.shape[0] == 2 * 18
        assert image.shape[1] == 4 * 18 and 0 <= image.min() and image.max() <= 1
