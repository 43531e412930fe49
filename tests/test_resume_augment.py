"""Exact resume with augmentation and with synthesised data, both drawn in loader workers: two
epochs straight end with bitwise the weights of one epoch plus a resumed one (tests/test_resume.py
proves it for a noise transform; these are the real transforms, from their config groups)."""
import pytest
import torch

from regkit.experiment import build
from tests.conftest import compose

AUGMENTED = ["dataset.shape=[16,16,16]", "dataset.n_train=4", "dataset.n_val=1", "dataset.n_test=0",
             "dataset.batch_size=1", "augment=strong"]
SYNTHESISED = ["dataset=synth_labels", "dataset.shape=[16,16,16]", "dataset.length=4", "loss=dice",
               "+loss.terms.grad.weight=1", "augment=light"]


def run(tmp_path, data_dir, setup, epochs, out, ckpt_path=None):
    cfg = compose(setup + [f"trainer.max_epochs={epochs}", "dataset.num_workers=2", "~logger", "trainer.device=cpu",
                           "callbacks.progress.enabled=false", "callbacks.validation.log_images=false"],
                  output_dir=tmp_path / out, data_dir=data_dir)
    parts = build(cfg)
    parts["trainer"].fit(parts["model"], parts["loss"], parts["optimizer"], parts["data"], ckpt_path=ckpt_path)
    return parts["trainer"], torch.cat([p.detach().flatten() for p in parts["model"].parameters()])


@pytest.mark.parametrize("setup, control", [(AUGMENTED, "augment=none"), (SYNTHESISED, "dataset.seed=1")],
                         ids=["augment=strong", "dataset=synth_labels"])
def test_two_epochs_equal_one_plus_a_resumed_one_bitwise(tmp_path, data_dir, setup, control):
    _, straight = run(tmp_path, data_dir, setup, 2, "straight")
    run(tmp_path, data_dir, setup, 1, "first")
    trainer, resumed = run(tmp_path, data_dir, setup, 2, "second", tmp_path / "first" / "checkpoints" / "last.ckpt")
    assert trainer.global_step == 8
    assert torch.equal(straight, resumed)
    # the control: without the augmentation, or with other synthesised samples, the weights differ
    _, other = run(tmp_path, data_dir, setup + [control], 2, "other")
    assert not torch.equal(straight, other)
