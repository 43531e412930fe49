"""The training loop. Side effects (validation, checkpoints, timing, logging, progress) are
callbacks; the loop itself only moves data, runs the model, the loss, backward and the step."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch
from torch import nn

from regkit.errors import InputError
from regkit.losses.composite import LossOutput
from regkit.training.checkpoint import load_checkpoint, model_spec, to_plain
from regkit.training.loggers import Logger
from regkit.training.timing import EpochTiming, PhaseTimer

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"Unknown device '{device}'. Use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' requested but CUDA is not available (torch {torch.__version__})")
    return dev


def move_to(batch: Mapping[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Callback:
    """Hooks called by :class:`Trainer`; lower ``order`` runs first at each hook."""

    order: int = 50

    def on_fit_start(self, trainer: "Trainer") -> None: ...
    def on_train_epoch_start(self, trainer: "Trainer") -> None: ...
    def on_train_batch_end(self, trainer: "Trainer", batch: Mapping[str, Any], losses: LossOutput) -> None: ...
    def on_train_epoch_end(self, trainer: "Trainer") -> None: ...
    def on_fit_end(self, trainer: "Trainer") -> None: ...
    def on_exception(self, trainer: "Trainer", exc: BaseException) -> None: ...

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


class Trainer:
    """Fits a registration model.

    Args:
        max_epochs: total epochs (a resumed run continues up to this number).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        callbacks: :class:`Callback` objects (a dict from a config, or a list).
        logger: a :class:`~regkit.training.loggers.Logger` or ``None``.
        log_every_n_steps: how often per-step scalars are written.
        grad_clip_norm: clip the gradient norm to this value (``None``: no clipping).
        sync_timing: synchronise CUDA at phase boundaries so timings are exact.
        warmup_steps: steps excluded from timing statistics after start/resume.
        limit_train_batches: use at most this many batches per epoch (quick runs, tests).
        output_dir: where the run writes (callbacks place files relative to their own paths).
        run_config: the run's full configuration, stored in checkpoints.

    After :meth:`fit`, ``metrics`` holds the latest scalars (e.g. ``val/dice``) and
    ``history`` one dict per epoch.
    """

    def __init__(self, max_epochs: int = 10, device: str = "auto", callbacks: Any = None,
                 logger: Optional[Logger] = None, log_every_n_steps: int = 10,
                 grad_clip_norm: Optional[float] = None, sync_timing: bool = True, warmup_steps: int = 2,
                 limit_train_batches: Optional[int] = None, output_dir: str = ".", run_config: Any = None) -> None:
        if max_epochs < 1:
            raise InputError(f"max_epochs must be >= 1, got {max_epochs}")
        if log_every_n_steps < 1:
            raise InputError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.max_epochs = int(max_epochs)
        self.device = resolve_device(device)
        if isinstance(callbacks, Mapping):
            callbacks = [c for c in callbacks.values() if c is not None]
        self.callbacks: List[Callback] = sorted(callbacks or [], key=lambda c: c.order)
        self.logger = logger
        self.log_every_n_steps = int(log_every_n_steps)
        self.grad_clip_norm = grad_clip_norm
        self.sync_timing, self.warmup_steps = bool(sync_timing), int(warmup_steps)
        self.limit_train_batches = limit_train_batches
        self.output_dir = Path(output_dir)
        self.run_config = to_plain(run_config) if run_config is not None else {}
        self.epoch = 0  # completed epochs
        self.global_step = 0
        self.metrics: Dict[str, float] = {}
        self.history: List[Dict[str, float]] = []
        self.last_timing: Optional[EpochTiming] = None
        self.should_stop = False

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, data: Any,
            ckpt_path: Optional[str] = None, scheduler: Any = None) -> Dict[str, float]:
        self.model, self.loss_fn, self.optimizer, self.scheduler, self.data = model, loss_fn, optimizer, scheduler, data
        data.setup()
        model.to(self.device)
        loss_fn.to(self.device)
        if ckpt_path:
            self.restore(ckpt_path)
        self.timer = PhaseTimer(self.device, self.sync_timing, self.warmup_steps)
        try:
            self._call("on_fit_start")
            while self.epoch < self.max_epochs and not self.should_stop:
                self.train_epoch()
                self._call("on_train_epoch_end")
                self.history.append({"epoch": self.epoch, **self.metrics})
            self._call("on_fit_end")
        except BaseException as exc:
            self._call("on_exception", exc)
            raise
        finally:
            if self.logger is not None:
                self.logger.close()
        return self.metrics

    def train_epoch(self) -> None:
        self.model.train()
        loader = self.train_loader()
        self._call("on_train_epoch_start")
        self.timer.start_epoch()
        for batch in self.timer.iterate(loader):
            batch = move_to(batch, self.device)
            with self.timer.phase("forward"):
                output = self.model(batch["moving"], batch["fixed"])
            with self.timer.phase("loss"):
                losses = self.loss_fn(output, batch)
            self._check_finite(losses)
            with self.timer.phase("backward"):
                self.optimizer.zero_grad(set_to_none=True)
                losses.total.backward()
            with self.timer.phase("step"):
                if self.grad_clip_norm:
                    nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
                self.optimizer.step()
            self.timer.end_step(batch["moving"].shape[0])
            self.global_step += 1
            self._call("on_train_batch_end", batch=batch, losses=losses)
        self.last_timing = self.timer.end_epoch()
        self.epoch += 1
        if self.scheduler is not None:
            self.scheduler.step()

    # -- helpers ----------------------------------------------------------------------------------
    def train_loader(self) -> Iterable:
        loader = self.data.train_dataloader()
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        if self.limit_train_batches:
            from itertools import islice

            n = min(len(loader), int(self.limit_train_batches))
            return _Sized(islice(loader, n), n)
        return loader

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.data.train_dataloader())
        return min(n, int(self.limit_train_batches)) if self.limit_train_batches else n

    def _check_finite(self, losses: LossOutput) -> None:
        if not torch.isfinite(losses.total.detach()):
            terms = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.terms.items())
            raise FloatingPointError(
                f"non-finite loss at epoch {self.epoch + 1}, step {self.global_step + 1}: total="
                f"{float(losses.total):.4g} ({terms}); lower the learning rate or check the inputs"
            )

    def _call(self, hook: str, *args, **kwargs) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args, **kwargs)

    def log(self, scalars: Mapping[str, float], step: Optional[int] = None) -> None:
        """Record scalars in ``metrics`` and send them to the logger (default step: epoch)."""
        clean = {k: float(v) for k, v in scalars.items() if v is not None}
        self.metrics.update(clean)
        if self.logger is not None:
            self.logger.log_scalars(clean, self.epoch if step is None else step)

    # -- checkpoint state -------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "model": model_spec(self.model),
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "metrics": dict(self.metrics),
            "config": self.run_config,
            # how the data was prepared (normalisation, size), for inference on new scans
            "data": to_plain(self.data.spec()) if hasattr(self.data, "spec") else None,
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks},
            "rng": torch.get_rng_state(),
        }

    def restore(self, path: str) -> None:
        data = load_checkpoint(path)
        want = model_spec(self.model)
        have = data["model"]
        if have["name"] != want["name"]:
            raise InputError(
                f"{path}: checkpoint holds model '{have['name']}' but the config builds '{want['name']}'; "
                f"run with model={have['name']}"
            )
        try:
            self.model.load_state_dict(data["state_dict"])
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise InputError(f"{path}: weights do not fit model '{want['name']}' with this config ({first})") from None
        self.optimizer.load_state_dict(data["optimizer"])
        if self.scheduler is not None and data.get("scheduler") is not None:
            self.scheduler.load_state_dict(data["scheduler"])
        self.epoch, self.global_step = int(data["epoch"]), int(data["global_step"])
        self.metrics.update(data.get("metrics", {}))
        for cb in self.callbacks:
            cb.load_state_dict(data.get("callbacks", {}).get(type(cb).__name__, {}))
        if "rng" in data:
            torch.set_rng_state(data["rng"])
        if self.epoch >= self.max_epochs:
            log.warning("%s: already trained %d epochs (max_epochs=%d); nothing to do", path, self.epoch, self.max_epochs)
        else:
            log.info("resumed from %s at epoch %d/%d (step %d)", path, self.epoch, self.max_epochs, self.global_step)


class _Sized:
    """An iterable with a length (``islice`` loses ``len``)."""

    def __init__(self, it, n):
        self.it, self.n = it, n

    def __iter__(self):
        return iter(self.it)

    def __len__(self):
        return self.n
