"""Registration networks. Importing this package registers every model."""
from regkit.models.base import RegistrationModel, RegistrationOutput
from regkit.models.registry import MODELS, create_model, list_models
from regkit.models import voxelmorph  # noqa: F401  (registers vxm1, vxm2)
from regkit.models import lkunet  # noqa: F401  (lkunet, lkunet16, lkunet4, lkunet_diff)
from regkit.models import transmorph  # noqa: F401  (transmorph)
from regkit.models import student  # noqa: F401  (student)

__all__ = ["RegistrationModel", "RegistrationOutput", "MODELS", "create_model", "list_models"]
