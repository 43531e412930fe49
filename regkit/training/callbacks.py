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
from regkit.errors import InputError, check_choice
from regkit.losses.composite import LossOutput
from regkit.evaluation import LABEL_MODES, pair_metrics, warp_labels  # noqa: F401 (warp_labels re-exported)
from regkit.spatial import warp
from regkit.training.checkpoint import save_checkpoint
from regkit.training.trainer import Callback, Trainer

log = logging.getLogger("regkit")

def slice_panel(moving: torch.Tensor, fixed: torch.Tensor, warped: torch.Tensor, flow: torch.Tensor) -> np.ndarray:
    """A picture: rows are the three orthogonal mid-slices; columns are moving, fixed, warped,
    the deformation grid (the flow's effect on a regular grid) and the Jacobian determinant
    (grey 0.5 = volume kept, white = expansion ×2 or more, black = folding, det J <= 0). 2-D
    inputs give one row."""
    from regkit.spatial import jacobian_determinant

    ndim = flow.shape[1]
    shape = flow.shape[2:]
    grid = torch.zeros(1, 1, *shape, device=flow.device, dtype=flow.dtype)
    step = max(4, min(shape) // 12)
    for d in range(ndim):
        idx = [slice(None)] * (ndim + 2)
        idx[2 + d] = slice(0, None, step)
        grid[tuple(idx)] = 1.0
    grid_w = warp(grid, flow[:1], mode="bilinear")
    jac = (jacobian_determinant(flow[:1].double()).float() / 2).clamp(0, 1)[:, None]
    vols = [v[0, 0].detach().float().cpu().numpy() for v in (moving, fixed, warped, grid_w, jac)]
    vols = [np.clip((v - v.min()) / (v.max() - v.min() + 1e-8), 0, 1) if i < 3 else v for i, v in enumerate(vols)]
    if ndim == 2:
        return np.concatenate([v.T[::-1] for v in vols], axis=1)
    slices = [[np.take(v, v.shape[axis] // 2, axis=axis).T[::-1] for v in vols] for axis in range(3)]
    # one cell size for every slice, images centred in it, so the columns line up across rows
    h = max(s.shape[0] for row in slices for s in row)
    w = max(s.shape[1] for row in slices for s in row)

    def cell(s):
        top, left = (h - s.shape[0]) // 2, (w - s.shape[1]) // 2
        return np.pad(s, ((top, h - s.shape[0] - top), (left, w - s.shape[1] - left)))

    return np.concatenate([np.concatenate([cell(s) for s in row], axis=1) for row in slices], axis=0)


class Validation(Callback):
    """Validation metrics after every ``every_n_epochs`` epochs.

    Logs ``val/dice`` (mean over pairs of the mean over ``eval_labels``), ``val/dice_groups``
    (mean over the dataset's label groups, e.g. the IXI 17 structures, when it has groups),
    ``val/nonpos_jac_pct`` (% voxels with det J <= 0) and ``val/sdlogj`` (``jacobian``),
    ``val/hd95`` in mm (``hd95``), ``val/loss/<term>``, ``time/validation`` and a picture
    ``val/slices``. Before the first epoch it logs the unregistered Dice (identity transform) as
    ``val/dice`` at epoch 0 and ``val/dice_before``. Conventions: ``docs/evaluation.md``.

    Under torchrun the pairs are split over the ranks (pair k on rank k mod W) and the per-pair
    values gathered in pair order, so every rank gets the single-process metrics (and can agree
    on what to do with them) while each evaluates 1/W of the pairs.

    Args:
        label_mode: ``nearest`` (default) or ``linear`` (one-hot) label warping; published Dice
            moves by ~0.005-0.01 between the two, so the choice is logged with the run
            (``val/label_mode`` text).
        max_pairs: validate on at most this many pairs (``None``: all).
        jacobian: log the folding and SDlogJ metrics (cheap; default on).
        hd95: log HD95 (default off: exact but costly, seconds per pair at 160×192×224 on a CPU
            for the 30 IXI labels, see docs/benchmarks.md; turn on for small images or a GPU).
    """

    order = 0

    def __init__(self, every_n_epochs: int = 1, label_mode: str = "nearest", before_training: bool = True,
                 max_pairs: Optional[int] = None, log_images: bool = True, jacobian: bool = True,
                 hd95: bool = False) -> None:
        check_choice("label_mode", label_mode, LABEL_MODES)
        self.every_n_epochs, self.label_mode = int(every_n_epochs), label_mode
        self.before_training, self.max_pairs, self.log_images = before_training, max_pairs, log_images
        self.jacobian, self.hd95 = bool(jacobian), bool(hd95)

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
        groups = getattr(trainer.data, "label_groups", None)
        indices, loader = self._my_pairs(trainer.data.val_dataloader())
        was_training = model.training
        model.eval()
        scores, terms, picture = {}, {}, None  # per pair index
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
                has_labels = bool(labels) and "moving_label" in batch
                if has_labels or (self.jacobian and not identity):
                    spacing = batch["spacing"][0].tolist() if "spacing" in batch else None
                    m = pair_metrics(flow, batch.get("moving_label") if has_labels else None, batch.get("fixed_label"),
                                     labels, spacing, self.label_mode, self.hd95 and not identity, groups)
                    keys = {"dice_mean": "val/dice", "dice_groups_mean": "val/dice_groups", "hd95_mean": "val/hd95"}
                    if self.jacobian and not identity:
                        keys.update({"nonpos_jac_pct": "val/nonpos_jac_pct", "sdlogj": "val/sdlogj"})
                    scores[k] = {tag: torch.as_tensor(m[key]).detach().cpu().reshape(-1)
                                 for key, tag in keys.items() if key in m}
                if k == 0 and self.log_images and not identity:
                    picture = slice_panel(batch["moving"], batch["fixed"], warped, flow)
        finally:
            model.train(was_training)
        # Gather every rank's pairs and combine them in pair order: the same numbers as one process.
        for part_scores, part_terms in distributed.all_gather_objects((scores, terms)):
            scores.update(part_scores)
            terms.update(part_terms)
        metrics = {}
        for name in (next(iter(terms.values())) if terms else {}):
            metrics[f"val/loss/{name}"] = float(np.mean([terms[k][name] for k in sorted(terms)]))
        for tag in sorted({t for per_pair in scores.values() for t in per_pair}):
            values = [scores[k][tag] for k in sorted(scores) if tag in scores[k]]
            metrics[tag] = float(torch.cat(values).double().nanmean())
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
