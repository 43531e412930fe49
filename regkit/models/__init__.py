"""Registration networks. Importing this package registers every model."""
from regkit.models.base import RegistrationModel, RegistrationOutput
from regkit.models.registry import MODELS, create_model, list_models
from regkit.models import voxelmorph  # noqa: F401  (registers vxm1, vxm2)

__all__ = ["RegistrationModel", "RegistrationOutput", "MODELS", "create_model", "list_models"]
