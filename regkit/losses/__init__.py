"""Loss terms and the weighted composite used for training. Importing this package imports every
module in it, so each loss file registers its terms without being listed anywhere."""
from regkit.losses.registry import LOSSES, create_loss, list_losses
from regkit.losses.composite import CompositeLoss, LossOutput
from regkit.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["LOSSES", "create_loss", "list_losses", "CompositeLoss", "LossOutput"]
