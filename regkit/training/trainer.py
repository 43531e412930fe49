"""The training loop. Side effects (validation, checkpoints, timing, logging, progress) are
callbacks; the loop itself only moves data, runs the model, the loss, backward and the step."""
from __future__ import annotations

import logging
import signal
import threading
import warnings
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from regkit import distributed
from regkit.device import check_precision, memory_format, move_to, resolve_device
from regkit.errors import InputError, TrainingError
from regkit.losses.composite import LossOutput
from regkit.checkpoint import load_checkpoint, model_spec, to_plain
from regkit.training.loggers import Logger
from regkit.training.state import rng_state, set_rng_state
from regkit.training.timing import EpochTiming, PhaseTimer

log = logging.getLogger(__name__)


class Callback:
    """Hooks called by :class:`Trainer`; lower ``order`` runs first at each hook. Under torchrun
    a callback with ``rank_zero_only = True`` runs on rank 0 only (files, progress bars); the
    others run on every rank and must then call the same collectives in the same order."""

    order: int = 50
    rank_zero_only: bool = False

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
        precision: ``fp32``, ``bf16`` or ``fp16``: the model's forward runs under
            ``torch.autocast`` with that dtype; its output field, the warping and the loss stay
            float32; ``fp16`` scales the loss (``torch.amp.GradScaler``).
        compile: run training steps through ``torch.compile``.
        channels_last: keep conv weights and input images channels-last (NDHWC).
        dist_backend: ``auto`` (``nccl`` on CUDA, ``gloo`` on the CPU), ``gloo`` or ``nccl``:
            used when launched by torchrun with more than one process (then the model is
            wrapped in ``DistributedDataParallel``; see :mod:`regkit.distributed`).
        dist_timeout_min: how long a collective waits for the other ranks.
        requeue: also stop (after the step in progress, saving ``interrupted.ckpt``) on SIGUSR2,
            the warning SLURM sends before a job's time limit (``hydra/launcher=slurm``); the
            signal is then handed on to the launcher, which requeues the job, and the requeued
            job continues from the checkpoint with ``ckpt_path=auto``.
        num_threads: torch's CPU threads for this process (``None``: torch's default, all
            cores; a parallel sweep sets each job's share, see :func:`regkit.distributed.place_sweep_job`).

    After :meth:`fit`, ``metrics`` holds the latest scalars (e.g. ``val/dice``) and
    ``history`` one dict per epoch.
    """

    def __init__(self, max_epochs: int = 10, device: str = "auto", callbacks: Any = None,
                 logger: Optional[Logger] = None, log_every_n_steps: int = 10,
                 grad_clip_norm: Optional[float] = None, sync_timing: bool = True, warmup_steps: int = 2,
                 limit_train_batches: Optional[int] = None, output_dir: str = ".", run_config: Any = None,
                 precision: str = "fp32", compile: bool = False, channels_last: bool = False,
                 dist_backend: str = "auto", dist_timeout_min: float = 30.0,
                 num_threads: Optional[int] = None, requeue: bool = False) -> None:
        if max_epochs < 1:
            raise InputError(f"max_epochs must be >= 1, got {max_epochs}")
        if log_every_n_steps < 1:
            raise InputError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.max_epochs = int(max_epochs)
        self.requeue = bool(requeue)
        if num_threads is not None:
            if int(num_threads) < 1:
                raise InputError(f"num_threads must be >= 1 or null, got {num_threads}")
            torch.set_num_threads(int(num_threads))
        self.device = resolve_device(device)
        self.precision, self.autocast_dtype = precision, check_precision(precision, self.device)
        self.compile, self.channels_last = bool(compile), bool(channels_last)
        self.dist_backend = dist_backend
        distributed.resolve_backend(dist_backend, self.device)  # fail before any work
        self.dist_timeout_min = float(dist_timeout_min)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
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
        self.batch_in_epoch = 0  # batches done in the current (unfinished) epoch
        self.interrupted: Optional[str] = None  # the signal that asked the run to stop, if any
        self.train_module: Optional[nn.Module] = None  # set by fit: the model, wrapped as configured
        self.train_loader: Any = None  # set by fit, built once (its workers persist across epochs)

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, data: Any,
            ckpt_path: Optional[str] = None, scheduler: Any = None) -> Dict[str, float]:
        """Train up to ``max_epochs``; under torchrun, on every rank (DDP)."""
        self.model, self.loss_fn, self.optimizer, self.scheduler, self.data = model, loss_fn, optimizer, scheduler, data
        owns_group = distributed.setup(self.device, self.dist_backend, self.dist_timeout_min)
        try:
            with distributed.rank_zero_first():  # rank 0 generates data, if any, before the others look
                data.setup()
            model.to(self.device)
            if self.channels_last:
                model.to(memory_format=memory_format(getattr(model, "ndim", 3)))
            loss_fn.to(self.device)
            if ckpt_path:
                self.restore(ckpt_path)  # every rank reads the same file, so they start equal
            self.train_module = self._wrap(model)
            self.train_loader = data.train_dataloader()
            self.timer = PhaseTimer(self.device, self.sync_timing, self.warmup_steps)
            with StopSignals(self):
                self._fit_loop()
            distributed.barrier()  # returning on any rank means rank 0's files are written
        finally:
            distributed.cleanup(owns_group)
        return self.metrics

    def _fit_loop(self) -> None:
        try:
            self._call("on_fit_start")
            while self.epoch < self.max_epochs and not self.should_stop:
                self.train_epoch()
                self._call("on_train_epoch_end")
                self.should_stop = distributed.any_rank(self.should_stop, self.device)
                self.history.append({"epoch": self.epoch, **self.metrics})
            self._call("on_fit_end")
        except BaseException as exc:
            self._call("on_exception", exc)
            raise
        finally:
            if self.logger is not None:
                self.logger.close()

    def _wrap(self, model: nn.Module) -> nn.Module:
        """What the training step calls: the model, in DDP under torchrun, compiled on request.
        Callbacks and checkpoints use the plain ``self.model`` (same parameters)."""
        module = model
        if distributed.is_distributed():
            # RegistrationOutput (a dataclass) passes through DDP untouched: gradients are
            # reduced by parameter hooks, which need no output traversal while every
            # parameter is used (find_unused_parameters=False).
            module = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.compile:
            module = torch.compile(module)
        return module

    def autocast(self):
        """The context the model's forward runs in (a no-op for fp32)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def to_device(self, batch: Mapping[str, Any]) -> Dict[str, Any]:
        batch = move_to(batch, self.device)
        if self.channels_last:
            for key in ("moving", "fixed"):
                x = batch[key]
                batch[key] = x.contiguous(memory_format=memory_format(x.dim() - 2))
        return batch

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor):
        """One training forward, under autocast; a failing ``torch.compile`` is reported as such."""
        try:
            with self.autocast():
                return self.train_module(moving, fixed)
        except Exception as exc:
            # torch.compile's errors come from torch._dynamo (not imported here: it is heavy)
            if self.compile and type(exc).__module__.startswith("torch._dynamo"):
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise RuntimeError(f"trainer.compile=true: torch.compile failed on {self.device} ({first}); "
                                   f"train without it: trainer.compile=false") from exc
            raise

    def train_epoch(self) -> None:
        self.model.train()
        loader = self.epoch_batches()
        self._call("on_train_epoch_start")
        self.timer.start_epoch()
        for batch in self.timer.iterate(loader):
            batch = self.to_device(batch)
            losses = self.training_step(batch)
            self.timer.end_step(batch["moving"].shape[0])
            self.global_step += 1
            self.batch_in_epoch += 1
            self._call("on_train_batch_end", batch=batch, losses=losses)
            self.stop_if_interrupted()
        self.last_timing = self.timer.end_epoch()
        self.epoch += 1
        self.batch_in_epoch = 0
        if self.scheduler is not None:
            self.scheduler.step()

    def training_step(self, batch: Mapping[str, Any]) -> LossOutput:
        """One optimisation step on a batch already on the device; returns the loss terms.

        Subclasses with a different step (e.g. :class:`regkit.distill.DistillationTrainer`)
        override this and keep the phase names, so the timing breakdown stays comparable.
        """
        with self.timer.phase("forward"):
            output = self.forward(batch["moving"], batch["fixed"])
        with self.timer.phase("loss"):
            losses = self.loss_fn(output, batch)  # float32, outside autocast
        self._check_finite(losses)
        self.backward_and_step(losses.total)
        return losses

    def backward_and_step(self, total: torch.Tensor) -> None:
        """Back-propagate ``total`` (scaled under fp16; DDP averages the gradients here), clip,
        and step the model's optimizer, timed as the ``backward`` and ``optimizer`` phases."""
        with self.timer.phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
        with self.timer.phase("optimizer"):
            self.clip_gradients()
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def clip_gradients(self) -> None:
        """Clip the model's gradient norm to ``grad_clip_norm`` (unscaled first under fp16)."""
        if self.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)

    # -- helpers ----------------------------------------------------------------------------------
    def epoch_batches(self) -> Iterable:
        """This epoch's batches: the sampler set to the epoch (and, after a resume inside it, to
        the first batch not yet done), at most ``limit_train_batches`` in all."""
        loader = self.train_loader
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        if self.batch_in_epoch and not hasattr(sampler, "set_start"):
            raise InputError(f"cannot resume inside an epoch: the training loader's sampler "
                             f"({type(sampler).__name__}) has no set_start")
        if hasattr(sampler, "set_start"):
            sampler.set_start(self.batch_in_epoch * (loader.batch_size or 1))
        n = self.steps_per_epoch - self.batch_in_epoch
        return loader if n == len(loader) else _Sized(islice(loader, n), n)

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.train_loader if self.train_loader is not None else self.data.train_dataloader())
        return min(n, int(self.limit_train_batches)) if self.limit_train_batches else n

    def stop_if_interrupted(self) -> None:
        """After a whole step: stop if SIGINT or SIGTERM arrived (on any rank), by raising
        :class:`Interrupted` (the checkpoint callback then saves the exact position)."""
        if distributed.any_rank(self.interrupted is not None, self.device):
            raise Interrupted(self.interrupted or "SIGTERM")

    def _check_finite(self, losses: LossOutput) -> None:
        if not torch.isfinite(losses.total.detach()):
            terms = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.terms.items())
            raise TrainingError(
                f"non-finite loss at epoch {self.epoch + 1}, step {self.global_step + 1}: total="
                f"{float(losses.total):.4g} ({terms}); lower the learning rate or check the inputs"
            )

    @property
    def is_global_zero(self) -> bool:
        return distributed.is_rank_zero()

    def _call(self, hook: str, *args, **kwargs) -> None:
        for cb in self.callbacks:
            if cb.rank_zero_only and not self.is_global_zero:
                continue
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
            "rng": rng_state(),
            # where the run stands inside the current epoch (non-zero after an interrupt)
            "batch_in_epoch": self.batch_in_epoch,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }

    def load_extra_state(self, data: Dict[str, Any]) -> None:
        """Restore what a subclass added to :meth:`state_dict` (nothing here)."""

    def restore(self, path: str) -> None:
        """Continue the run of checkpoint ``path``: weights, optimizer state, schedule, position,
        metrics, callbacks' and random states. Settings given now that differ from the checkpoint's
        run either take effect (learning rate and other optimizer settings, schedule, epochs,
        callbacks, loss weights; listed in the log) or, when they would change the model or the
        data (:data:`RESUME_REFUSED`), are refused in one line naming them."""
        data = load_checkpoint(path)
        changed = resume_changes(data.get("config") or {}, self.run_config, path)
        if "dataset.batch_size" in changed and int(data.get("batch_in_epoch", 0)):
            raise InputError(f"ckpt_path={path}: stopped inside an epoch, so it resumes with its batch size "
                             f"{changed['dataset.batch_size'][0]}, not {changed['dataset.batch_size'][1]}")
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
        # The optimizer's state (moments, step counts) comes from the checkpoint, its settings (lr,
        # betas, ...) from this run's config, so that e.g. optimizer.lr=... on resume takes effect.
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(data["optimizer"])
        for group, fresh in zip(self.optimizer.param_groups, settings):
            group.update(fresh)
        if self.scheduler is not None and data.get("scheduler") is not None:
            self.scheduler.load_state_dict(data["scheduler"])
            if hasattr(self.scheduler, "base_lrs"):  # the schedule continues from this run's lr at the saved epoch
                self.scheduler.base_lrs = [g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups]
                with warnings.catch_warnings():  # get_lr outside step() warns; here it is the intended use
                    warnings.simplefilter("ignore")
                    for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr()):
                        group["lr"] = lr
                self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.epoch, self.global_step = int(data["epoch"]), int(data["global_step"])
        self.metrics.update(data.get("metrics", {}))
        for cb in self.callbacks:
            cb.load_state_dict(data.get("callbacks", {}).get(type(cb).__name__, {}))
        self.load_extra_state(data)
        self.batch_in_epoch = int(data.get("batch_in_epoch", 0))
        if "rng" in data:
            set_rng_state(data["rng"])
        if self.scaler.is_enabled() and data.get("scaler"):
            self.scaler.load_state_dict(data["scaler"])
        if not self.is_global_zero:
            return
        for key, (old, new) in changed.items():
            log.info("resume: %s = %r in this run (the checkpoint's run had %r): takes effect", key, new, old)
        if self.epoch >= self.max_epochs:
            log.warning("%s: already trained %d epochs (max_epochs=%d); nothing to do", path, self.epoch, self.max_epochs)
        else:
            inside = f", batch {self.batch_in_epoch} of epoch {self.epoch + 1}" if self.batch_in_epoch else ""
            log.info("resumed from %s at epoch %d/%d (step %d%s)", path, self.epoch, self.max_epochs, self.global_step,
                     inside)


# Config keys whose change on resume would change the model or the data: refused. Everything else
# (optimizer, schedule, epochs, callbacks, logging, loss weights) takes effect, and is logged.
RESUME_REFUSED = ("model.", "transformer.", "dataset.")
# Dataset keys that change where or how fast the same data is read, not the data: allowed.
# (batch_size only regroups the same samples, e.g. per process under torchrun; not inside an epoch).
RESUME_ALLOWED = ("dataset.root", "dataset.num_workers", "dataset.cache", "dataset.validate",
                  "dataset.affine_check", "dataset.batch_size")
# Keys that always differ between two runs (their folders) or only name the checkpoint.
RESUME_IGNORED = ("paths.", "hydra.", "ckpt_path", "trainer.output_dir", "callbacks.checkpoint.dirpath",
                  "logger.", "task_name")


def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, Mapping):
        out: Dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def resume_changes(saved: Mapping[str, Any], current: Mapping[str, Any], path) -> Dict[str, tuple]:
    """``{key: (saved, current)}`` of the settings that differ between a checkpoint's run and this
    one and take effect; raises :class:`InputError` naming the keys that would change the model or
    the data. A checkpoint without a config (or a run without one) compares nothing."""
    if not saved or not current:
        return {}
    a, b = _flatten(saved), _flatten(current)
    changed = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    changed = {k: v for k, v in changed.items() if not k.startswith(RESUME_IGNORED)}
    refused = [k for k in changed if k.startswith(RESUME_REFUSED) and not k.startswith(RESUME_ALLOWED)]
    if refused:
        details = ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in refused)
        raise InputError(f"ckpt_path={path}: resuming cannot change the model or the data, but {details}; "
                         f"drop those overrides, or start a new run (initialised from scratch)")
    return changed


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop (Ctrl-C or SIGTERM) and stopped after a whole step."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class StopSignals:
    """While training, SIGINT (Ctrl-C) and SIGTERM (what SLURM and most schedulers send before
    killing a job), and SIGUSR2 with ``trainer.requeue``, only set ``trainer.interrupted``; the loop stops after the step in progress,
    so the checkpoint holds whole steps. A second Ctrl-C interrupts at once. Handlers are only
    installed in the main thread (Python allows no others) and restored on exit."""

    def __init__(self, trainer: "Trainer") -> None:
        self.trainer = trainer
        self.signals = ("SIGINT", "SIGTERM") + (("SIGUSR2",) if trainer.requeue else ())
        self.previous: Dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.trainer.interrupted is not None and name == "SIGINT":
            raise KeyboardInterrupt  # pressed twice: stop now
        self.trainer.interrupted = name
        log.warning("%s received: stopping after the current step and saving a checkpoint", name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in self.signals:
                num = getattr(signal, name)
                self.previous[num] = signal.signal(num, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for num, handler in self.previous.items():
            signal.signal(num, handler)
        self.previous.clear()


class _Sized:
    """An iterable with a length (``islice`` loses ``len``)."""

    def __init__(self, it, n):
        self.it, self.n = it, n

    def __iter__(self):
        return iter(self.it)

    def __len__(self):
        return self.n
