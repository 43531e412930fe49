"""Trainer, callbacks, loggers, timing and checkpoints."""
from regkit.training.trainer import Callback, Trainer
from regkit.training.callbacks import Checkpoint, EpochTimingLogger, LossLogger, ProgressBar, Validation
from regkit.checkpoint import load_checkpoint, load_model, save_checkpoint
from regkit.training.loggers import CSVLogger, Logger, MultiLogger, TensorBoardLogger
from regkit.training.timing import EpochTiming, PhaseTimer

__all__ = ["Callback", "Trainer", "Checkpoint", "EpochTimingLogger", "LossLogger", "ProgressBar",
           "Validation", "load_checkpoint", "load_model", "save_checkpoint", "CSVLogger", "Logger",
           "MultiLogger", "TensorBoardLogger", "EpochTiming", "PhaseTimer"]
