"""Registration networks. Importing this package imports every module in it, so each model file
registers its variants without being listed anywhere (a model is one file plus one YAML)."""
from regkit.models.base import RegistrationModel, RegistrationOutput
from regkit.models.registry import MODELS, ModelInfo, create_model, list_models, model_info
from regkit.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["RegistrationModel", "RegistrationOutput", "MODELS", "ModelInfo", "create_model", "list_models",
           "model_info"]
