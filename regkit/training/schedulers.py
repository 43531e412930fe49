"""Learning-rate schedules that YAML can name (a lambda cannot be written in a config)."""
from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from regkit.errors import InputError


def poly(optimizer: Optimizer, max_epochs: int, power: float = 0.9) -> LambdaLR:
    """``lr * (1 - epoch / max_epochs) ** power`` per epoch (TransMorph's IXI recipe)."""
    if max_epochs < 1:
        raise InputError(f"poly schedule: max_epochs must be >= 1, got {max_epochs}")
    return LambdaLR(optimizer, lambda e: max(0.0, 1.0 - e / max_epochs) ** power)
