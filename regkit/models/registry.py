"""The model registry: ``create_model(name, **overrides)`` and ``list_models()``."""
from __future__ import annotations

from typing import Any, List

from regkit.registry import Registry

MODELS = Registry("model")


def create_model(name: str, **overrides: Any):
    """Build the registered model ``name`` (a ``configs/model/<name>.yaml`` file name).

    ``overrides`` are passed to the model, e.g. ``create_model("vxm2", ndim=2, diffeomorphic=True)``.
    """
    return MODELS.create(name, **overrides)


def list_models() -> List[str]:
    return MODELS.names()
