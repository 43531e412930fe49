"""Exact resume: a run stopped and resumed (at an epoch boundary, or inside an epoch after
SIGTERM) ends with bitwise the weights of a run that never stopped, with randomness drawn in the
main process (torch, NumPy, Python) and in the data pipeline, with and without loader workers."""
import random

import numpy as np
import pytest
import torch

from regkit.experiment import build
from regkit.training import Callback, Trainer
from tests.conftest import TINY_DATA, compose


class NoisyTrainer(Trainer):
    """A training step that draws from every main-process generator (as dropout or a random
    loss weighting would): the weights then depend on where each generator stands."""

    def training_step(self, batch):
        jitter = 1.0 + 0.1 * torch.rand(()).item() + 0.1 * np.random.rand() + 0.1 * random.random()
        batch = dict(batch, fixed=batch["fixed"] * jitter)
        return super().training_step(batch)


def add_noise(item, generator):
    """A data transform drawing from the sample's own generator (as augmentation does)."""
    item = dict(item)
    item["moving"] = item["moving"] + 0.05 * torch.randn(item["moving"].shape, generator=generator)
    return item


class StopAt(Callback):
    """Sends the trainer the stop request SIGTERM would, after global step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, batch, losses):
        if trainer.global_step == self.step:
            trainer.interrupted = "SIGTERM"


def run(tmp_path, data_dir, epochs, workers, noise, ckpt_path=None, stop_at=None, out="run"):
    small = [o for o in TINY_DATA if not o.startswith(("dataset.shape", "dataset.n_train"))]
    cfg = compose(small + [f"trainer.max_epochs={epochs}", f"dataset.num_workers={workers}", "~logger",
                           "dataset.shape=[16,16,16]", "dataset.n_train=4", "callbacks.validation.log_images=false"],
                  output_dir=tmp_path / out, data_dir=data_dir)
    parts = build(cfg)
    old = parts["trainer"]
    trainer = NoisyTrainer(max_epochs=epochs, device="cpu", callbacks=old.callbacks + ([StopAt(stop_at)] if stop_at else []),
                           output_dir=old.output_dir, run_config=old.run_config)
    if noise:
        parts["data"].transform = add_noise
    trainer.fit(parts["model"], parts["loss"], parts["optimizer"], parts["data"], ckpt_path=ckpt_path)
    return trainer, torch.cat([p.detach().flatten() for p in parts["model"].parameters()])


@pytest.mark.parametrize("workers, noise", [(0, False), (2, True)])
def test_resume_at_an_epoch_boundary_is_bitwise_exact(tmp_path, data_dir, workers, noise):
    _, straight = run(tmp_path, data_dir, 2, workers, noise, out="straight")
    _, _ = run(tmp_path, data_dir, 1, workers, noise, out="first")
    trainer, resumed = run(tmp_path, data_dir, 2, workers, noise, out="second",
                           ckpt_path=tmp_path / "first" / "checkpoints" / "last.ckpt")
    assert trainer.global_step == 8
    assert torch.equal(straight, resumed)
    _, other = run(tmp_path, data_dir, 2, workers, not noise, out="other")
    assert not torch.equal(straight, other)  # the randomness does change the weights


def test_resume_inside_an_epoch_after_sigterm_is_bitwise_exact(tmp_path, data_dir):
    _, straight = run(tmp_path, data_dir, 2, 2, True, out="straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, data_dir, 2, 2, True, out="first", stop_at=6)  # batch 2 of epoch 2
    ckpt = tmp_path / "first" / "checkpoints" / "interrupted.ckpt"
    data = torch.load(ckpt, weights_only=True)
    assert (data["epoch"], data["batch_in_epoch"], data["global_step"]) == (1, 2, 6)
    trainer, resumed = run(tmp_path, data_dir, 2, 2, True, out="second", ckpt_path=ckpt)
    assert trainer.global_step == 8  # 2 more steps, not a re-run of the epoch
    assert torch.equal(straight, resumed)
