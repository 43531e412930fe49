"""The model registry: ``create_model(name, **overrides)``, ``list_models()`` and ``model_info(name)``.

A model is one file plus one YAML. The file defines the network and registers its variants, each
with its defining numbers (``defaults=``, every one overridable by keyword) and its metadata
(:class:`ModelInfo`) on the registration line::

    @MODELS.register(defaults=dict(start_channels=16, large_kernel=5),
                     info=ModelInfo(description="LKU-Net (16, 5)", params=8_339_702, ...))
    def lkunet16(**kwargs) -> LKUNet:
        return LKUNet(**kwargs)

``regkit.models`` imports every module of the package, so nothing else lists the model; the
tests, ``scripts/model_table.py`` (docs/models.md) and ``scripts/bench_models.py`` read the
registry. The YAML (``configs/model/<name>.yaml``) names the function as ``_target_``.

Every registered model also takes ``cascades=n`` (``model.cascades=n`` on the command line):
n > 1 builds n stages of that model, each with its own weights, as a recursive
:class:`~regkit.models.cascade.Cascade`. The option is handled here, once, rather than by each
model, and is recorded in the checkpoint's model spec like any other option.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional

from regkit.errors import InputError
from regkit.models.cascade import Cascade
from regkit.registry import Registry


@dataclass(frozen=True)
class ModelInfo:
    """What a registered model is, next to its registration (plain data).

    Attributes:
        description: one line for the model table (what it is; its defining numbers).
        paper: short citation of the paper the architecture comes from ("" if none).
        source: where the architecture was read (repository and file), or why there is none.
        params: parameters of regkit's build with the defaults (3-D, one channel per image);
            ``tests/test_models.py`` builds the model and checks this exact count.
        reference_params: the count of the reference implementation with the same settings,
            ``None`` when no reference code exists. Equal to ``params`` for a faithful build.
        reference_note: why ``reference_params`` differs from ``params`` (or is ``None``);
            required when it does.
    """

    description: str
    paper: str
    source: str
    params: int
    reference_params: Optional[int]
    reference_note: str = ""

    def __post_init__(self) -> None:
        if self.reference_params != self.params and not self.reference_note:
            raise ValueError(f"ModelInfo({self.description!r}): reference_params {self.reference_params} "
                             f"differs from params {self.params}; say why in reference_note")


def _build_with_cascades(build: Callable[..., Any], kwargs: Dict[str, Any]) -> Any:
    n = kwargs.pop("cascades", MODELS.shared_options["cascades"])
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"cascades must be an integer >= 1, got {n!r}")
    if n == 1:
        return build(**kwargs)
    return Cascade([build(**kwargs) for _ in range(n)])


MODELS = Registry("model", build=_build_with_cascades, shared_options={"cascades": 1}, info_type=ModelInfo)


def create_model(name: str, **overrides: Any):
    """Build the registered model ``name`` (a ``configs/model/<name>.yaml`` file name).

    ``overrides`` are passed to the model, e.g. ``create_model("vxm2", ndim=2, diffeomorphic=True)``
    or ``create_model("vxm1", enc_channels=(16, 32, 32, 32))``: every default can be overridden;
    ``cascades=n`` builds a recursive cascade of n such networks.
    """
    return MODELS.create(name, **overrides)


def list_models() -> List[str]:
    return MODELS.names()


def model_info(name: str) -> Dict[str, Any]:
    """The model's metadata as a plain dict: ``name``, the :class:`ModelInfo` fields, its own
    ``defaults`` (the registration's defining numbers) and ``options`` (every option with its
    default; required ones without a default are left out)."""
    options = {k: v for k, v in MODELS.options(name).items() if v is not inspect.Parameter.empty}
    return {"name": name, **asdict(MODELS.info(name)), "defaults": MODELS.defaults(name), "options": options}

