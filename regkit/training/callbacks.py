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
from regkit.evaluation import PairEvaluator
from regkit.predictor import Predictor, identity_output
from regkit.spatial import jacobian_determinant, warp
from regkit.checkpoint import save_checkpoint
from regkit.data.io import remove_stale_temp_files
from regkit.training.trainer import Callback, Interrupted, Trainer

log = logging.getLogger("regkit")

PANEL_COLUMNS = ("moving", "fixed", "warped", "fixed - warped", "deformation grid", "Jacobian determinant")


def slice_panel(moving: torch.Tensor, fixed: torch.Tensor, warped: torch.Tensor, flow: torch.Tensor,
                min_cell: int = 128) -> np.ndarray:
    """A picture of one registered pair, ``(H, W)`` in [0, 1]: rows are the three orthogonal
    mid-slices (one row in 2-D); the columns (:data:`PANEL_COLUMNS`) are

    1. moving, 2. fixed, 3. warped (all three on one grey scale, the moving and fixed images'
       joint range, so that brightness compares across columns);
    4. the difference fixed − warped (grey 0.5 = equal, white = fixed brighter, black = warped
       brighter; ±the joint range at the ends): what registration leaves unexplained;
    5. the deformation grid: a regular grid of lines warped by the flow. The lines lie half a
       grid step away from the shown slices, so a slice never falls on a grid plane (which would
       draw a blank cell);
    6. the Jacobian determinant (grey 0.5 = volume kept, white = expansion ×2 or more, black =
       folding, det J <= 0).

    Small volumes are scaled up (nearest neighbour) so that a cell is at least ``min_cell``
    pixels high.
    """
    ndim = flow.shape[1]
    shape = flow.shape[2:]
    step = max(4, min(shape) // 12)
    grid = torch.zeros(1, 1, *shape, device=flow.device, dtype=flow.dtype)
    for d in range(ndim):
        lines = [i for i in range(shape[d]) if (i - shape[d] // 2) % step == step // 2]
        idx = [slice(None)] * (ndim + 2)
        idx[2 + d] = lines
        grid[tuple(idx)] = 1.0
    grid_w = warp(grid, flow[:1], mode="bilinear")
    jac = (jacobian_determinant(flow[:1].double()).float() / 2).clamp(0, 1)[:, None]
    m, f, w = (v[0, 0].detach().float().cpu().numpy() for v in (moving, fixed, warped))
    lo, hi = min(m.min(), f.min()), max(m.max(), f.max())
    span = float(hi - lo) or 1.0
    scaled = [np.clip((v - lo) / span, 0, 1) for v in (m, f, w)]
    diff = np.clip(0.5 + (f - w) / (2 * span), 0, 1)
    vols = scaled + [diff] + [v[0, 0].detach().float().cpu().numpy() for v in (grid_w, jac)]
    if ndim == 2:
        rows = [[v.T[::-1] for v in vols]]
    else:
        rows = [[np.take(v, v.shape[axis] // 2, axis=axis).T[::-1] for v in vols] for axis in range(3)]
    # one cell size for every slice, images centred in it, so the columns line up across rows
    h = max(s.shape[0] for row in rows for s in row)
    wd = max(s.shape[1] for row in rows for s in row)

    def cell(s):
        top, left = (h - s.shape[0]) // 2, (wd - s.shape[1]) // 2
        return np.pad(s, ((top, h - s.shape[0] - top), (left, wd - s.shape[1] - left)))

    panel = np.concatenate([np.concatenate([cell(s) for s in row], axis=1) for row in rows], axis=0)
    factor = max(1, -(-min_cell // h))
    return np.repeat(np.repeat(panel, factor, axis=0), factor, axis=1)


class Validation(Callback):
    """Runs an evaluation function on the validation pairs every ``every_n_epochs`` epochs
    (detectron2's ``EvalHook(period, function)``): the callback decides when and on which pairs,
    the :class:`~regkit.evaluation.PairEvaluator` it is handed computes the metrics.

    Logs the mean over pairs of each metric as ``val/<metric>``: ``val/dice`` (mean over the
    dataset's ``eval_labels``), ``val/dice_groups`` (over its label groups, e.g. the IXI 17),
    ``val/nonpos_jac_pct`` (% voxels with det J <= 0), ``val/sdlogj``, ``val/hd95`` (mm),
    ``val/tre`` (mm, keypoint tasks) and ``val/loss/<term>``; also ``time/validation`` and a picture ``val/slices`` of the first pair
    (:func:`slice_panel`). Before the first epoch it logs the unregistered Dice (identity
    transform) as ``val/dice`` at epoch 0 and ``val/dice_before``. Conventions:
    ``docs/evaluation.md``.

    Under torchrun the pairs are split over the ranks (pair k on rank k mod W) and the per-pair
    rows gathered in pair order, so every rank gets the single-process metrics (and can agree
    on what to do with them) while each evaluates 1/W of the pairs.

    Args:
        evaluator: the evaluation function (default: ``PairEvaluator()``, nearest label warping,
            Jacobian metrics on, HD95 off); its ``label_mode`` is logged as ``val/label_mode``.
        before_training: log the unregistered Dice first.
        log_images: log ``val/slices``.
    """

    order = 0

    def __init__(self, evaluator: Optional[PairEvaluator] = None, every_n_epochs: int = 1,
                 before_training: bool = True, log_images: bool = True) -> None:
        if int(every_n_epochs) < 1:
            raise InputError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.evaluator = evaluator or PairEvaluator()
        self.every_n_epochs = int(every_n_epochs)
        self.before_training, self.log_images = bool(before_training), bool(log_images)

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.logger is not None:
            trainer.logger.log_text("val/label_mode", self.evaluator.label_mode)
        if self.before_training and trainer.epoch == 0 and trainer.data.val_dataloader() is not None:
            metrics = self.evaluate(trainer, identity=True)
            before = {}
            if "val/dice" in metrics:
                before.update({"val/dice": metrics["val/dice"], "val/dice_before": metrics["val/dice"]})
            if "val/tre_before" in metrics:
                before.update({"val/tre": metrics["val/tre_before"], "val/tre_before": metrics["val/tre_before"]})
            if before:
                trainer.log(before, step=0)

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
        """This rank's ``(index, batch)`` pairs, batch 1."""
        n = self.evaluator.count(len(loader.dataset))
        mine = list(range(n))[distributed.rank()::distributed.world_size()]
        subset = DataLoader(Subset(loader.dataset, mine), batch_size=1, num_workers=loader.num_workers,
                            collate_fn=loader.collate_fn)
        return zip(mine, subset)

    def evaluate(self, trainer: Trainer, identity: bool = False) -> Dict[str, float]:
        """``val/*`` metrics of the current model (or of the identity transform)."""
        data = trainer.data
        predict = identity_output if identity else Predictor(trainer.model, autocast_dtype=trainer.autocast_dtype)
        result = self.evaluator(predict, self._my_pairs(data.val_dataloader()), trainer.device, data.eval_labels,
                                getattr(data, "label_groups", None), None if identity else trainer.loss_fn,
                                dice_only=identity, keep_example=self.log_images and not identity)
        rows = {}
        for part in distributed.all_gather_objects(result.rows):  # every rank's pairs, in pair order
            rows.update(part)
        scalars = PairEvaluator.summarize(rows)
        keys = {"dice": "val/dice", "dice_groups": "val/dice_groups", "hd95": "val/hd95",
                "nonpos_jac_pct": "val/nonpos_jac_pct", "sdlogj": "val/sdlogj", "tre": "val/tre"}
        metrics = {tag: scalars[key] for key, tag in keys.items() if key in scalars}
        if identity and "tre" in scalars:
            metrics["val/tre_before"] = scalars["tre"]
        metrics.update({f"val/{k}": v for k, v in scalars.items() if k.startswith("loss/")})
        if result.example is not None and trainer.logger is not None:
            batch, out = result.example
            trainer.logger.log_image("val/slices", slice_panel(batch["moving"], batch["fixed"], out.warped, out.flow),
                                     trainer.epoch)
        return metrics


class Checkpoint(Callback):
    """Writes ``last.ckpt`` every epoch and ``best.ckpt`` when ``monitor`` improves on its best and
    on ``baseline`` (the unregistered Dice: a model worse than the identity is never "best"); on Ctrl-C or
    SIGTERM writes ``interrupted.ckpt`` after the step in progress (with the position inside the
    epoch, so that resuming from it equals an uninterrupted run). Every file is written to a temporary file and renamed. Under
    torchrun only rank 0 writes (the ranks hold the same weights; DDP keeps them equal)."""

    order = 20
    rank_zero_only = True

    def __init__(self, dirpath: str, monitor: Optional[str] = "val/dice", mode: str = "max",
                 save_last: bool = True, every_n_epochs: int = 1, baseline: Optional[str] = "val/dice_before") -> None:
        self.interrupted_path: Optional[Path] = None
        self.baseline = baseline
        if mode not in ("max", "min"):
            raise InputError(f"Checkpoint mode must be 'max' or 'min', got {mode!r}")
        self.dirpath, self.monitor, self.mode = Path(dirpath), monitor, mode
        self.save_last, self.every_n_epochs = save_last, int(every_n_epochs)
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.best_path: Optional[Path] = None
        self.last_path: Optional[Path] = None
        self._warned = False

    def on_fit_start(self, trainer: Trainer) -> None:
        for leftover in remove_stale_temp_files(self.dirpath):  # from a kill during a write
            log.info("removed %s, left by an interrupted checkpoint write", leftover)

    def _improved(self, value: float, baseline: Optional[float] = None) -> bool:
        if value is None or math.isnan(value):
            return False
        if baseline is not None and (value < baseline if self.mode == "max" else value > baseline):
            return False  # worse than not registering at all: never "best"
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if trainer.epoch % self.every_n_epochs and trainer.epoch != trainer.max_epochs:
            return
        value = trainer.metrics.get(self.monitor) if self.monitor else None
        baseline = trainer.metrics.get(self.baseline) if self.baseline else None
        improved = self._improved(value, baseline)
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
        if isinstance(exc, Interrupted):  # stopped between two steps: the state is exact
            self.interrupted_path = save_checkpoint(self.dirpath / "interrupted.ckpt", trainer.state_dict())
            log.warning("%s: saved %s at epoch %d, batch %d (resuming continues from there)", exc.signal_name,
                        self.interrupted_path, trainer.epoch + 1, trainer.batch_in_epoch)
        elif isinstance(exc, KeyboardInterrupt):  # a second Ctrl-C: possibly inside a step, so nothing exact to save
            log.warning("stopped at once: no checkpoint of the unfinished epoch (last.ckpt holds the last finished one)")

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")


class DivergenceWarning(Callback):
    """Says so, once each, when training goes wrong: the epoch's mean loss grows by orders of
    magnitude over the first epoch's (more than ``factor`` times its size away from it, e.g. a
    learning rate far too high), or validation Dice falls below the unregistered Dice. A non-finite
    loss stops the run in the trainer itself (one line)."""

    order = 40  # after validation and the loss logger have logged this epoch

    def __init__(self, factor: float = 100.0) -> None:
        self.factor = float(factor)
        self.first: Optional[float] = None
        self.warned: Dict[str, bool] = {}

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        m = trainer.metrics
        loss = m.get("train/epoch_loss/total")
        if loss is not None and math.isfinite(loss):
            if self.first is None:
                self.first = loss
            elif abs(loss - self.first) > self.factor * max(abs(self.first), 1e-3) and not self.warned.get("loss"):
                self.warned["loss"] = True
                log.warning("warning: the training loss is diverging: %.4g at epoch %d against %.4g at the first; lower "
                            "the learning rate (now %g, e.g. optimizer.lr=%g)", loss, trainer.epoch, self.first,
                            trainer.optimizer.param_groups[0]["lr"], trainer.optimizer.param_groups[0]["lr"] / 10)
        dice, before = m.get("val/dice"), m.get("val/dice_before")
        if dice is not None and before is not None and dice < before and not self.warned.get("dice"):
            self.warned["dice"] = True
            log.warning("warning: validation Dice %.4f at epoch %d is below the unregistered Dice %.4f: the model "
                        "is worse than not registering (best.ckpt is only written for models better than that)",
                        dice, trainer.epoch, before)

    def state_dict(self) -> Dict[str, Any]:
        return {"first": self.first}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.first = state.get("first")


class EpochTimingLogger(Callback):
    """Logs the epoch's wall time and its breakdown (``time/data``, ``time/forward``,
    ``time/loss``, ``time/backward``, ``time/optimizer``, shares, samples/s, peak memory); under
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


def _label_edges(label: np.ndarray) -> np.ndarray:
    """Where a 2-D label map changes value between neighbouring pixels (boundaries, one pixel wide)."""
    edge = np.zeros(label.shape, dtype=bool)
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    return edge


def preview_row(items) -> np.ndarray:
    """One RGB row ``(H, W, 3)`` in [0, 1]: for each item, the mid-slice (last axis) of its moving
    and fixed images, each with its label map's boundaries in red when it has one."""
    cells = []
    for item in items:
        for key in ("moving", "fixed"):
            vol = item[key][0].detach().float().cpu().numpy()
            image = vol if vol.ndim == 2 else np.take(vol, vol.shape[-1] // 2, axis=-1)
            image = np.clip((image - image.min()) / (image.max() - image.min() + 1e-8), 0, 1).T[::-1]
            rgb = np.repeat(image[..., None], 3, axis=2)
            label = item.get(f"{key}_label")
            if label is not None:
                lab = label[0].cpu().numpy()
                lab = lab if lab.ndim == 2 else np.take(lab, lab.shape[-1] // 2, axis=-1)
                rgb[_label_edges(lab.T[::-1])] = (1.0, 0.1, 0.1)
            cells.append(np.pad(rgb, ((1, 1), (1, 1), (0, 0))))
    return np.concatenate(cells, axis=1)


class AugmentationPreview(Callback):
    """Shows once per run what the network is trained on: a picture ``data/augmentation`` logged
    at the start of training (not after a resume). Row k is training pair k: its moving and
    fixed images as loaded (for synthesised data: as synthesised), then as the network sees them
    in epoch 1 (augmented; synthesised data without augmentation is shown once), mid-slices of
    the last axis, label-map boundaries in red (they must follow the anatomy). Nothing is logged when the training data is neither augmented nor
    synthesised. Items are drawn with their own generators (the sample keys of epoch 1), so
    the picture changes no random state of the run."""

    order = 5
    rank_zero_only = True

    def __init__(self, samples: int = 3) -> None:
        if int(samples) < 1:
            raise InputError(f"AugmentationPreview samples must be >= 1, got {samples}")
        self.samples = int(samples)

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.logger is None or trainer.epoch or trainer.batch_in_epoch or trainer.train_loader is None:
            return
        ds = trainer.train_loader.dataset
        base = getattr(ds, "base", ds)  # keypoint datasets wrap the pair dataset
        transform = getattr(base, "transform", None)
        active = transform is not None and getattr(transform, "enabled", True)
        if not (active or getattr(base, "synthesised", False)) or not hasattr(base, "load"):
            return
        n = min(self.samples, len(base))
        # as loaded next to as trained; synthesised pairs without a transform are shown once
        rows = [preview_row([base.load(i), base[(0, i)]] if active else [base[(0, i)]]) for i in range(n)]
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
        trainer.logger.log_image("data/augmentation", np.concatenate(rows, axis=0), 0)
