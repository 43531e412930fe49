"""The model registry: ``create_model(name, **overrides)`` and ``list_models()``.

Every registered model also takes ``cascades=n`` (``model.cascades=n`` on the command line):
n > 1 builds n stages of that model, each with its own weights, as a recursive
:class:`~regkit.models.cascade.Cascade`. The option is handled here, once, rather than by each
model, and is recorded in the checkpoint's model spec like any other option.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

from regkit.errors import InputError
from regkit.registry import Registry


def _build_with_cascades(build: Callable[..., Any], kwargs: Dict[str, Any]) -> Any:
    n = kwargs.pop("cascades", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"cascades must be an integer >= 1, got {n!r}")
    if n == 1:
        return build(**kwargs)
    from regkit.models.cascade import Cascade

    return Cascade([build(**kwargs) for _ in range(n)])


MODELS = Registry("model", build=_build_with_cascades)


def create_model(name: str, **overrides: Any):
    """Build the registered model ``name`` (a ``configs/model/<name>.yaml`` file name).

    ``overrides`` are passed to the model, e.g. ``create_model("vxm2", ndim=2, diffeomorphic=True)``;
    ``cascades=n`` builds a recursive cascade of n such networks.
    """
    return MODELS.create(name, **overrides)


def list_models() -> List[str]:
    return MODELS.names()
