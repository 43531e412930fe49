"""Trainer callbacks: validation, checkpoints, timing, loss logging and progress."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from regkit import distributed
from regkit.errors import InputError
from regkit.losses.composite import LossOutput
from regkit.metrics import dice
from regkit.spatial import warp
from regkit.training.checkpoint import save_checkpoint
from regkit.training.trainer import Callback, Trainer

log = logging.getLogger("regkit")

LABEL_MODES = ("nearest", "linear")


def warp_labels(label_map: torch.Tensor, flow: torch.Tensor, labels, mode: str = "nearest") -> torch.Tensor:
    """Warp an integer label map: ``nearest`` resamples the IDs directly; ``linear`` warps the
    one-hot maps of ``labels`` linearly and takes the arg-max (background where none wins)."""
    if mode == "nearest":
        return warp(label_map.float(), flow, mode="nearest").round().long()
    if mode != "linear":
        raise InputError(f"Unknown label_mode '{mode}'. Valid: {', '.join(LABEL_MODES)}.")
    from regkit.metrics import one_hot

    ids = [0] + [int(v) for v in labels if v != 0]
    warped = warp(one_hot(label_map, ids, dtype=flow.dtype), flow, mode="bilinear")
    return torch.as_tensor(ids, device=flow.device)[warped.argmax(1, keepdim=True)]


def slice_panel(moving: torch.Tensor, fixed: torch.Tensor, warped: torch.Tensor, flow: torch.Tensor) -> np.ndarray:
    """A picture: rows are the three orthogonal mid-slices; columns are moving, fixed, warped
    and the deformation grid (the flow's effect on a regular grid). 2-D inputs give one row."""
    ndim = flow.shape[1]
    shape = flow.shape[2:]
    grid = torch.zeros(1, 1, *shape, device=flow.device, dtype=flow.dtype)
    step = max(4, min(shape) // 12)
    for d in range(ndim):
        idx = [slice(None)] * (ndim + 2)
        idx[2 + d] = slice(0, None, step)
        grid[tuple(idx)] = 1.0
    grid_w = warp(grid, flow, mode="bilinear")
    vols = [v[0, 0].detach().float().cpu().numpy() for v in (moving, fixed, warped, grid_w)]
    vols = [np.clip((v - v.min()) / (v.max() - v.min() + 1e-8), 0, 1) if i < 3 else v for i, v in enumerate(vols)]
    if ndim == 2:
        return np.concatenate([v.T[::-1] for v in vols], axis=1)
    rows = []
    for axis in range(3):
        sl = [np.take(v, v.shape[axis] // 2, axis=axis).T[::-1] for v in vols]
        h = max(s.shape[0] for s in sl)
        w = max(s.shape[1] for s in sl)
        sl = [np.pad(s, ((0, h - s.shape[0]), (0, w - s.shape[1]))) for s in sl]
        rows.append(np.concatenate(sl, axis=1))
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows], axis=0)


class Validation(Callback):
    """Validation Dice (and loss terms) after every ``every_n_epochs`` epochs.

    Logs ``val/dice`` (mean over pairs of the mean over ``eval_labels``), ``val/loss/<term>``,
    ``time/validation`` and a picture ``val/slices``. Before the first epoch it logs the
    unregistered Dice (identity transform) as ``val/dice`` at epoch 0 and ``val/dice_before``.

    Under torchrun the pairs are split over the ranks (pair k on rank k mod W) and the per-pair
    values gathered in pair order, so every rank gets the single-process metrics (and can agree
    on what to do with them) while each evaluates 1/W of the pairs.

    Args:
        label_mode: ``nearest`` (default) or ``linear`` (one-hot) label warping; published Dice
            moves by ~0.005-0.01 between the two, so the choice is logged with the run.
        max_pairs: validate on at most this many pairs (``None``: all).
    """

    order = 0

    def __init__(self, every_n_epochs: int = 1, label_mode: str = "nearest", before_training: bool = True,
                 max_pairs: Optional[int] = None, log_images: bool = True) -> None:
        if label_mode not in LABEL_MODES:
            raise InputError(f"Unknown label_mode '{label_mode}'. Valid: {', '.join(LABEL_MODES)}.")
        self.every_n_epochs, self.label_mode = int(every_n_epochs), label_mode
        self.before_training, self.max_pairs, self.log_images = before_training, max_pairs, log_images

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.logger is not None:
            trainer.logger.log_text("val/label_mode", self.label_mode)
        if self.before_training and trainer.epoch == 0 and trainer.data.val_dataloader() is not None:
            metrics = self.evaluate(trainer, identity=True)
            if "val/dice" in metrics:
                trainer.log({"val/dice": metrics["val/dice"], "val/dice_before": metrics["val/dice"]}, step=0)

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if trainer.epoch % self.every_n_epochs and trainer.epoch != trainer.max_epochs:
            return
        if trainer.data.val_dataloader() is None:
            return
        start = time.perf_counter()
        metrics = self.evaluate(trainer)
        metrics["time/validation"] = time.perf_counter() - start
        trainer.log(metrics)

    def _my_pairs(self, loader: DataLoader):
        """This rank's pair indices and a batch-1 loader over them."""
        n = len(loader.dataset) if self.max_pairs is None else min(len(loader.dataset), self.max_pairs)
        mine = list(range(n))[distributed.rank()::distributed.world_size()]
        return mine, DataLoader(Subset(loader.dataset, mine), batch_size=1, num_workers=loader.num_workers,
                                collate_fn=loader.collate_fn)

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, identity: bool = False) -> Dict[str, float]:
        model, labels = trainer.model, trainer.data.eval_labels
        indices, loader = self._my_pairs(trainer.data.val_dataloader())
        was_training = model.training
        model.eval()
        dices, terms, picture = {}, {}, None  # per pair index
        try:
            for k, batch in zip(indices, loader):
                batch = trainer.to_device(batch)
                if identity:
                    flow = torch.zeros(batch["moving"].shape[0], batch["moving"].dim() - 2,
                                       *batch["moving"].shape[2:], device=trainer.device)
                    warped = batch["moving"]
                else:
                    with trainer.autocast():
                        out = model(batch["moving"], batch["fixed"])
                    flow, warped = out.flow, out.warped
                    losses = trainer.loss_fn(out, batch)
                    terms[k] = {name: float(v) for name, v in losses.terms.items()}
                    terms[k]["total"] = float(losses.total)
                if labels and "moving_label" in batch:
                    wl = warp_labels(batch["moving_label"], flow, labels, self.label_mode)
                    dices[k] = torch.nanmean(dice(wl, batch["fixed_label"], labels), dim=1).cpu()
                if k == 0 and self.log_images and not identity:
                    picture = slice_panel(batch["moving"], batch["fixed"], warped, flow)
        finally:
            model.train(was_training)
        # Gather every rank's pairs and combine them in pair order: the same numbers as one process.
        for part_dices, part_terms in distributed.all_gather_objects((dices, terms)):
            dices.update(part_dices)
            terms.update(part_terms)
        metrics = {}
        for name in (next(iter(terms.values())) if terms else {}):
            metrics[f"val/loss/{name}"] = float(np.mean([terms[k][name] for k in sorted(terms)]))
        if dices:
            metrics["val/dice"] = float(torch.cat([dices[k] for k in sorted(dices)]).nanmean())
        if picture is not None and trainer.logger is not None:
            trainer.logger.log_image("val/slices", picture, trainer.epoch)
        return metrics


class Checkpoint(Callback):
    """Writes ``last.ckpt`` every epoch and ``best.ckpt`` when ``monitor`` improves; on Ctrl-C
    writes ``interrupted.ckpt``. Every file is written to a temporary file and renamed. Under
    torchrun only rank 0 writes (the ranks hold the same weights; DDP keeps them equal)."""

    order = 20
    rank_zero_only = True

    def __init__(self, dirpath: str, monitor: Optional[str] = "val/dice", mode: str = "max",
                 save_last: bool = True, every_n_epochs: int = 1) -> None:
        if mode not in ("max", "min"):
            raise InputError(f"Checkpoint mode must be 'max' or 'min', got {mode!r}")
        self.dirpath, self.monitor, self.mode = Path(dirpath), monitor, mode
        self.save_last, self.every_n_epochs = save_last, int(every_n_epochs)
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.best_path: Optional[Path] = None
        self.last_path: Optional[Path] = None
        self._warned = False

    def _improved(self, value: float) -> bool:
        if value is None or math.isnan(value):
            return False
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if trainer.epoch % self.every_n_epochs and trainer.epoch != trainer.max_epochs:
            return
        value = trainer.metrics.get(self.monitor) if self.monitor else None
        improved = self._improved(value)
        if improved:
            self.best, self.best_epoch = float(value), trainer.epoch
        payload = trainer.state_dict()
        if self.save_last:
            self.last_path = save_checkpoint(self.dirpath / "last.ckpt", payload)
        if improved:
            self.best_path = save_checkpoint(self.dirpath / "best.ckpt", payload)
        elif self.monitor and value is None and not self._warned:
            log.warning("checkpoint: metric '%s' is not logged (no validation data?); saving last.ckpt only", self.monitor)
            self._warned = True

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        if isinstance(exc, KeyboardInterrupt):
            path = save_checkpoint(self.dirpath / "interrupted.ckpt", trainer.state_dict())
            log.warning("interrupted: saved %s (resume with ckpt_path=%s; the unfinished epoch is re-run)", path, path)

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")


class EpochTimingLogger(Callback):
    """Logs the epoch's wall time and its breakdown (``time/data``, ``time/forward``,
    ``time/loss``, ``time/backward``, ``time/step``, shares, samples/s, peak memory); under
    torchrun, rank 0's (``throughput/samples_per_s`` is then per process)."""

    order = 10
    rank_zero_only = True

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if trainer.last_timing is not None:
            trainer.log(trainer.last_timing.scalars())


class LossLogger(Callback):
    """Logs ``train/loss/<term>`` and ``train/loss/total`` every ``trainer.log_every_n_steps``
    steps, the learning rate, and per-epoch means as ``train/epoch_loss/<term>``. Under torchrun
    the logged values are averaged over the ranks, i.e. they are the global batch's loss."""

    order = 10

    def __init__(self) -> None:
        self._sums: Dict[str, float] = {}
        self._n = 0

    def on_train_epoch_start(self, trainer: Trainer) -> None:
        self._sums, self._n = {}, 0

    def on_train_batch_end(self, trainer: Trainer, batch: Mapping[str, Any], losses: LossOutput) -> None:
        values = {"total": float(losses.total.detach())}
        values.update({k: float(v.detach()) for k, v in losses.terms.items()})
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._n += 1
        if trainer.global_step % trainer.log_every_n_steps == 0 or trainer.global_step == 1:
            values = distributed.mean_over_ranks(values, trainer.device)
            scalars = {f"train/loss/{k}": v for k, v in values.items()}
            scalars["train/lr"] = trainer.optimizer.param_groups[0]["lr"]
            trainer.log(scalars, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if self._n:
            means = {k: v / self._n for k, v in self._sums.items()}
            trainer.log({f"train/epoch_loss/{k}": v for k, v in distributed.mean_over_ranks(means, trainer.device).items()})


class ProgressBar(Callback):
    """tqdm bars over the steps of each epoch, and a one-line summary per epoch (rank 0 only)."""

    order = 30
    rank_zero_only = True

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar = None

    def on_train_epoch_start(self, trainer: Trainer) -> None:
        if self.enabled:
            self.bar = tqdm(total=trainer.steps_per_epoch, desc=f"epoch {trainer.epoch + 1}/{trainer.max_epochs}",
                            unit="step", leave=False, dynamic_ncols=True)

    def on_train_batch_end(self, trainer: Trainer, batch: Mapping[str, Any], losses: LossOutput) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{float(losses.total.detach()):.4f}", refresh=False)

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        m = trainer.metrics
        parts = [f"epoch {trainer.epoch}/{trainer.max_epochs}"]
        if "train/epoch_loss/total" in m:
            parts.append(f"loss {m['train/epoch_loss/total']:.4f}")
        if "val/dice" in m:
            parts.append(f"val dice {m['val/dice']:.4f}")
        if trainer.last_timing is not None:
            parts.append(f"{trainer.last_timing.wall:.1f} s")
        log.info(" | ".join(parts))

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        if self.bar is not None:
            self.bar.close()
