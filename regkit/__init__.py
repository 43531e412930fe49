"""regkit: end-to-end deep image registration training.

Public API::

    regkit.create_model(name, **overrides)   regkit.list_models()
    regkit.create_loss(name, **overrides)    regkit.list_losses()
    regkit.warp(image, flow, mode="bilinear" | "nearest")

A model is called ``model(moving, fixed)`` and returns a :class:`RegistrationOutput` with
``.warped`` and ``.flow`` (displacement in voxels, ``(B, ndim, *spatial)``, channel k along
spatial axis k).
"""
__version__ = "0.1.0"

from regkit.errors import InputError, MissingFileError, RegkitError
from regkit.spatial import SpatialTransformer, compose_flows, integrate_velocity, warp
from regkit.models import RegistrationModel, RegistrationOutput, create_model, list_models
from regkit.losses import CompositeLoss, LossOutput, create_loss, list_losses

__all__ = [
    "__version__", "create_model", "list_models", "create_loss", "list_losses", "warp",
    "SpatialTransformer", "compose_flows", "integrate_velocity", "RegistrationModel",
    "RegistrationOutput", "CompositeLoss", "LossOutput", "RegkitError", "InputError",
    "MissingFileError",
]
