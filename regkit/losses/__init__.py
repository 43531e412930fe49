"""Loss terms and the weighted composite used for training. Importing registers every loss."""
from regkit.losses.registry import LOSSES, create_loss, list_losses
from regkit.losses import dice, keypoints, lncc, regularizers, similarity  # noqa: F401  (register the terms)
from regkit.losses.composite import CompositeLoss, LossOutput

__all__ = ["LOSSES", "create_loss", "list_losses", "CompositeLoss", "LossOutput"]
