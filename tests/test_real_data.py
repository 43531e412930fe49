"""Real brain MRI from ../shared/data/real (or $REGKIT_REAL_DATA); every test skips when absent.

uint8 LIA NIfTI, FreeSurfer .mgz (256³, other vox2ras, big-endian int32 labels), the OASIS pair
whose label header is wrong, and the affine-only Dice baseline of subjects 2 -> 1.
"""
import nibabel as nib
import numpy as np
import pytest
import torch

import regkit
from regkit.data import PairData, load_volume
from regkit.data.pairs import Pair
from regkit.inference import register_files
from regkit.metrics import IXI_LABELS, IXI_STRUCTURES, dice, group_scores
from regkit.checkpoint import model_spec, save_checkpoint

pytestmark = pytest.mark.realdata
COMMON = "common_160x192x224"
LIA = [[-1, 0, 0, 80], [0, 0, 1, -112], [0, -1, 0, 96], [0, 0, 0, 1]]


def test_uint8_lia_volumes_load(real_data):
    vol = load_volume(real_data / COMMON / "subj1_vxm_norm.nii.gz")
    assert vol.data.shape == (160, 192, 224) and vol.data.dtype == np.float32 and vol.data.max() <= 255
    assert np.array_equal(vol.affine, LIA) and nib.aff2axcodes(vol.affine) == ("L", "I", "A")
    lab = load_volume(real_data / COMMON / "subj1_vxm_aseg.nii.gz", np.int64, label=True)
    assert set(IXI_LABELS) <= set(np.unique(lab.data).tolist())


def test_mgz_volumes_load_with_their_own_vox2ras(real_data):
    norm = load_volume(real_data / "freesurfer_native_256" / "subjN_norm.mgz")
    seg = load_volume(real_data / "freesurfer_native_256" / "subjN_aparc.a2009s+aseg.mgz", np.int64, label=True)
    other = load_volume(real_data / "freesurfer_native_256" / "subjM_brainmask.mgz")
    assert norm.data.shape == seg.data.shape == (256, 256, 256)
    assert np.allclose(norm.affine, seg.affine) and not np.allclose(norm.affine, other.affine)
    assert seg.data.max() > 11000  # a2009s cortical parcels survive the big-endian int32 read


def test_affine_only_dice_baseline(real_data):
    a = torch.from_numpy(load_volume(real_data / COMMON / "subj1_vxm_aseg.nii.gz", np.int64, label=True).data)[None]
    b = torch.from_numpy(load_volume(real_data / COMMON / "subj2_niivueN_aseg.nii.gz", np.int64, label=True).data)[None]
    per_label = dice(b, a, IXI_LABELS)
    assert per_label.nanmean().item() == pytest.approx(0.611, abs=5e-4)
    assert group_scores(per_label, IXI_LABELS, IXI_STRUCTURES).shape == (1, 17)


def test_wrong_label_header_is_reported(real_data):
    d = real_data / "oasis_lapirn_160x192x144"
    image, bad, fixed = d / "image_A_160x192x144.nii.gz", d / "image_A_160x192x144_seg.nii.gz", d / "image_A_160x192x144_seg_affinefixed.nii.gz"
    other, other_seg = d / "image_B_160x192x144.nii.gz", d / "image_B_160x192x144_seg.nii.gz"
    with pytest.raises(ValueError) as err:
        PairData(train=[Pair(image, other, bad, other_seg, id="A->B")]).setup()
    assert f"label map {bad} and image {image} have different affines" in str(err.value)
    data = PairData(train=[Pair(image, other, fixed, other_seg, id="A->B")], eval_labels=[2]).setup()
    item = data.datasets["train"][0]
    unregistered = dice(item["moving_label"], item["fixed_label"], [2]).item()
    assert unregistered == pytest.approx(0.767, abs=5e-4)  # the README's white-matter figure


@pytest.mark.slow  # 256³ input, five 160×192×224 outputs written: ~20-40 s on 2 cores
def test_register_mgz_to_the_common_grid(real_data, tmp_path):
    torch.manual_seed(0)
    model = regkit.create_model("vxm1")
    ckpt = tmp_path / "m.ckpt"
    save_checkpoint(ckpt, {"model": model_spec(model), "state_dict": model.state_dict(), "config": {},
                           "data": {"normalize": "minmax", "shape": [48, 48, 48]}})
    d = real_data / "freesurfer_native_256"
    fixed = real_data / COMMON / "subj1_vxm_norm.nii.gz"
    r = register_files(ckpt, d / "subjN_norm.mgz", fixed, tmp_path / "out", moving_label=d / "subjN_aparc.a2009s+aseg.mgz",
                       device="cpu")
    assert any("resampled onto the fixed grid" in n for n in r["notes"])
    for name in ("warped", "jacdet", "warped_label"):
        img = nib.load(str(tmp_path / "out" / f"{name}.nii.gz"))
        assert img.shape == (160, 192, 224) and np.array_equal(img.affine, LIA)
    warped = np.asanyarray(nib.load(str(tmp_path / "out" / "warped.nii.gz")).dataobj)
    assert warped.max() > 50  # the brain landed inside the fixed field of view
    with pytest.raises(ValueError, match="have different affines"):
        register_files(ckpt, real_data / "oasis_lapirn_160x192x144" / "image_A_160x192x144.nii.gz", fixed,
                       tmp_path / "bad", moving_label=real_data / "oasis_lapirn_160x192x144" / "image_A_160x192x144_seg.nii.gz")
    assert not (tmp_path / "bad").exists()
