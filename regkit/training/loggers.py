"""Where scalars and pictures go. The trainer calls ``logger.log_scalars(dict, step)``."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, Optional

import numpy as np
from torch.utils.tensorboard import SummaryWriter


class Logger:
    def log_scalars(self, scalars: Dict[str, float], step: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """``image`` is ``(H, W)`` or ``(H, W, 3)`` in [0, 1]."""

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(Logger):
    """Writes TensorBoard event files under ``log_dir``."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_scalars(self, scalars, step):
        for name, value in scalars.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(name, float(value), step)

    def log_image(self, tag, image, step):
        fmt = "HW" if image.ndim == 2 else "HWC"
        self.writer.add_image(tag, np.clip(image, 0, 1).astype(np.float32), step, dataformats=fmt)

    def log_text(self, tag, text, step=0):
        self.writer.add_text(tag, text, step)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


class CSVLogger(Logger):
    """Appends ``step,name,value`` rows to ``<log_dir>/metrics.csv`` (easy to grep or plot)."""

    def __init__(self, log_dir: str) -> None:
        self.path = Path(log_dir) / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        self._fh = open(self.path, "a", newline="")
        self._w = csv.writer(self._fh)
        if new:
            self._w.writerow(["step", "name", "value"])

    def log_scalars(self, scalars, step):
        for name, value in scalars.items():
            self._w.writerow([step, name, value])

    def flush(self):
        self._fh.flush()

    def close(self):
        self._fh.close()


class MultiLogger(Logger):
    """Forwards to several loggers (``logger=many``)."""

    def __init__(self, loggers: Optional[Dict[str, Logger]] = None, **named: Logger) -> None:
        self.loggers = [lg for lg in {**(loggers or {}), **named}.values() if lg is not None]

    def log_scalars(self, scalars, step):
        for lg in self.loggers:
            lg.log_scalars(scalars, step)

    def log_image(self, tag, image, step):
        for lg in self.loggers:
            lg.log_image(tag, image, step)

    def log_text(self, tag, text, step=0):
        for lg in self.loggers:
            lg.log_text(tag, text, step)

    def flush(self):
        for lg in self.loggers:
            lg.flush()

    def close(self):
        for lg in self.loggers:
            lg.close()
