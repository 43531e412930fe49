"""The loss registry: ``create_loss(name, **overrides)`` and ``list_losses()``.

Each registered loss is a module with an ``inputs`` attribute that says what it is called on:

* ``"images"``: ``loss(warped, fixed)`` (similarity terms);
* ``"flow"``: ``loss(flow)`` (regularisers; the velocity field for diffeomorphic models, or
  the displacement when the term has ``uses_displacement = True``);
* ``"labels"``: ``loss(warped_onehot_labels, fixed_onehot_labels)`` (label supervision);
* ``"keypoints"``: ``loss(flow, fixed_kp, moving_kp, mask, spacing)`` (keypoint supervision).

Every call returns a scalar tensor; lower is better.

A term is a class registered under its config name (``@LOSSES.register(name="lncc") class LNCC``);
its options and their defaults are its constructor's signature, the one place they are written.
``create_loss`` builds the class through the registry (an unknown option fails with the valid
ones), a config's ``_target_`` names the class itself, and ``configs/loss/*.yaml`` list options
as ``${regkit.default:}`` (:func:`regkit.registry.config_default`) rather than repeating them.
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
