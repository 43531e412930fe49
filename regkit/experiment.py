"""Build every object of a run from its composed config and train. ``train.py`` calls this;
tests call it with configs from Hydra's compose API."""
from __future__ import annotations

import logging
import random
import secrets
import signal
import sys
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from regkit import distributed
from regkit.checkpoint import init_weights, to_plain
from regkit.errors import InputError
from regkit.pretrained import pretrained_path
from regkit.training.callbacks import Checkpoint
from regkit.training.trainer import Interrupted

log = logging.getLogger("regkit")


def unique_dir(base: str) -> str:
    """``${regkit.unique_dir:PATH}``: a new folder ``PATH_xxxx`` (4 random hex digits), created
    exclusively, so that two runs started in the same second never share a folder. Registered
    with OmegaConf's resolver cache, which Hydra copies into every job of a sweep, so one run
    resolves it to one folder however often its config is read."""
    parent = Path(base).parent
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(1000):
        path = Path(f"{base}_{secrets.token_hex(2)}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return str(path)
    raise InputError(f"{base}: could not create a new run folder next to it")


if not OmegaConf.has_resolver("regkit.unique_dir"):
    OmegaConf.register_new_resolver("regkit.unique_dir", unique_dir, use_cache=True)
if not OmegaConf.has_resolver("regkit.pretrained"):  # ${regkit.pretrained:synth-brain}: a shipped checkpoint's file
    OmegaConf.register_new_resolver("regkit.pretrained", lambda name: str(pretrained_path(name)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def instantiate(node: Any, **kwargs: Any) -> Any:
    return hydra_instantiate(node, **kwargs) if node is not None else None


def _missing_values(node: Any, prefix: str = "") -> list:
    """Keys whose value is still ``???`` (mandatory, not given), found without resolving."""
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _missing_values(v, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _missing_values(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if node == "???" else []


def build(cfg: DictConfig) -> Dict[str, Any]:
    """Instantiate data, model, loss, optimizer, scheduler, callbacks, logger and trainer."""
    missing = _missing_values(OmegaConf.to_container(cfg, resolve=False))
    if missing:
        raise InputError(f"missing required value{'s' if len(missing) > 1 else ''}: {', '.join(missing)}; "
                         f"set {'them' if len(missing) > 1 else 'it'} on the command line, e.g. {missing[0]}=...")
    seed_everything(int(cfg.seed))
    data = instantiate(cfg.dataset)
    model = instantiate(cfg.model)
    loss = instantiate(cfg.loss)
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer) if cfg.get("scheduler") else None
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    # Under torchrun only rank 0 writes logs (a TensorBoard writer creates its files when built).
    logger = instantiate(cfg.logger) if cfg.get("logger") and distributed.is_rank_zero() else None
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    # Passed after instantiation: Hydra would try to instantiate the _target_ nodes inside it.
    trainer.run_config = to_plain(cfg)
    return {"data": data, "model": model, "loss": loss, "optimizer": optimizer, "scheduler": scheduler,
            "trainer": trainer}


def train(cfg: DictConfig) -> Dict[str, float]:
    """Train as configured; returns the final metrics (``val/dice`` etc.)."""
    placement = distributed.place_sweep_job(cfg)  # its GPU and CPU share under local_parallel
    if placement:
        log.info("%s", placement)
    parts = build(cfg)
    trainer = parts["trainer"]
    model = parts["model"]
    if distributed.is_rank_zero():
        log.info("model %s: %s parameters | loss: %s | device: %s | output: %s",
                 cfg.model._target_.rsplit(".", 1)[-1], f"{model.num_parameters():,}", parts["loss"].extra_repr(),
                 trainer.device, trainer.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), trainer.output_dir)
    init_from = cfg.get("init_from")
    if init_from and not ckpt_path:  # a resumed run holds its own weights already
        source = init_weights(model, init_from)
        if distributed.is_rank_zero():
            log.info("init_from: weights of %s (%s, step %s)", init_from, source["model"]["name"],
                     source.get("global_step"))
    try:
        metrics = trainer.fit(model, parts["loss"], parts["optimizer"], parts["data"],
                              ckpt_path=ckpt_path, scheduler=parts["scheduler"])
    except Interrupted as exc:
        saved = next((cb.interrupted_path for cb in trainer.callbacks if isinstance(cb, Checkpoint)), None)
        if distributed.is_rank_zero():
            where = f"checkpoint {saved}" if saved else "no checkpoint (no checkpoint callback)"
            resume = f"; resume with: {resume_command(saved)}" if saved else ""
            print(f"regkit: interrupted by {exc.signal_name} at epoch {trainer.epoch + 1}, batch "
                  f"{trainer.batch_in_epoch}: {where}{resume}", file=sys.stderr)
        if exc.signal_name == "SIGUSR2" and callable(signal.getsignal(signal.SIGUSR2)):
            signal.raise_signal(signal.SIGUSR2)  # the launcher's own handler (submitit) requeues the job
        raise SystemExit(128 + int(getattr(signal, exc.signal_name, signal.SIGINT))) from None
    if distributed.is_rank_zero():
        report(trainer)
    return metrics


def resolve_ckpt_path(ckpt_path, output_dir) -> "str | None":
    """``ckpt_path`` as given, or for ``auto`` the newer of this run folder's
    ``checkpoints/interrupted.ckpt`` and ``last.ckpt``, else ``None`` (a requeued job continues
    where it stopped; a first start starts afresh)."""
    if ckpt_path != "auto":
        return ckpt_path
    found = [p for p in (Path(output_dir) / "checkpoints" / n for n in ("interrupted.ckpt", "last.ckpt")) if p.is_file()]
    if found:
        newest = max(found, key=lambda p: p.stat().st_mtime)
        log.info("ckpt_path=auto: resuming from %s", newest)
        return str(newest)
    log.info("ckpt_path=auto: no checkpoint in %s yet; starting afresh", Path(output_dir) / "checkpoints")
    return None


def resume_command(checkpoint) -> str:
    """The command line that continues this run from ``checkpoint``: this run's own overrides
    (when Hydra started it) with ``ckpt_path`` set."""
    try:
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]
    except ValueError:  # not started by @hydra.main (e.g. the compose API)
        overrides = []
    return " ".join(["python train.py", *overrides, f"ckpt_path={checkpoint}"])


def report(trainer) -> None:
    """Say where the results went and what validation Dice was reached, before vs after."""
    lines = ["", "=" * 72, f"finished {trainer.epoch}/{trainer.max_epochs} epochs, {trainer.global_step} steps"]
    for cb in trainer.callbacks:
        if isinstance(cb, Checkpoint):
            if cb.last_path:
                lines.append(f"checkpoint (last): {cb.last_path}")
            if cb.best_path:
                lines.append(f"checkpoint (best): {cb.best_path}  [epoch {cb.best_epoch}, {cb.monitor} {cb.best:.4f}]")
    log_dir = getattr(trainer.logger, "log_dir", None)
    if log_dir is not None:
        lines.append(f"TensorBoard logs:  {log_dir}   (view: tensorboard --logdir {log_dir})")
    m = trainer.metrics
    before = m.get("val/dice_before")
    after = m.get("val/dice")
    if after is not None:
        head = f"validation Dice: {before:.4f} before (unregistered) -> " if before is not None else "validation Dice: "
        best = next((cb.best for cb in trainer.callbacks if isinstance(cb, Checkpoint) and cb.best is not None), None)
        lines.append(head + f"{after:.4f} after (last epoch)" + (f", best {best:.4f}" if best is not None else ""))
    if trainer.last_timing is not None:
        t = trainer.last_timing
        lines.append(f"last epoch: {t.wall:.1f} s wall, {t.step_mean * 1000:.0f} ms/step, data share "
                     f"{t.scalars().get('time/data_share', float('nan')):.1%}")
    lines.append("=" * 72)
    for line in lines:
        log.info(line)
