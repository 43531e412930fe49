"""The loss registry: ``create_loss(name, **overrides)`` and ``list_losses()``.

Each registered loss is a module with an ``inputs`` attribute that says what it is called on:

* ``"images"``: ``loss(warped, fixed)`` (similarity terms);
* ``"flow"``: ``loss(flow)`` (regularisers; the velocity field for diffeomorphic models, or
  the displacement when the term has ``uses_displacement = True``);
* ``"labels"``: ``loss(warped_onehot_labels, fixed_onehot_labels)`` (label supervision);
* ``"keypoints"``: ``loss(flow, fixed_kp, moving_kp, mask, spacing)`` (keypoint supervision).

Every call returns a scalar tensor; lower is better.
"""
from __future__ import annotations

from typing import Any, List

from regkit.registry import Registry

LOSSES = Registry("loss")


def create_loss(name: str, **overrides: Any):
    """Build the registered loss term ``name`` (a ``configs/loss/<name>.yaml`` file name)."""
    return LOSSES.create(name, **overrides)


def list_losses() -> List[str]:
    return LOSSES.names()
