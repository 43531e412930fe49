"""Data-parallel training on PyTorch's own engine: ``torchrun`` + ``torch.distributed`` + DDP.

``torchrun --nproc_per_node=N train.py ...`` starts N processes and gives each the environment
variables ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. From these
:func:`setup` picks the process's device (``cuda:LOCAL_RANK``, or the CPU) and joins the process
group (``nccl`` on CUDA, ``gloo`` on the CPU). Without those variables everything here is a
no-op for a single process, so the trainer calls it unconditionally.

What is shared and what is not (see docs/scaling.md):

* every rank builds the same model from the same seed; DDP broadcasts rank 0's weights at
  wrap time and averages gradients in backward;
* each rank reads a disjoint shard of every epoch's permutation
  (:func:`regkit.data.module.train_sampler`);
* validation is sharded over the ranks as well and gathered, so every rank holds the same
  metrics; files (TensorBoard, checkpoints, ``.hydra/``, ``train.log``) are written by rank 0;
* all ranks write into one Hydra output folder, rank 0's, agreed in :class:`HydraRunDir`.
"""
from __future__ import annotations

import datetime
import logging
import os
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as _HydraCallback
from omegaconf import open_dict, read_write

from regkit.device import (env_local_rank, env_rank, env_world_size, launched_by_torchrun,  # noqa: F401
                           resolve_device)
from regkit.errors import InputError, check_choice

log = logging.getLogger("regkit")

BACKENDS = ("auto", "gloo", "nccl")


# -- where am I --------------------------------------------------------------------------------
def is_distributed() -> bool:
    """A process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Global rank: from the process group when there is one, else from the environment."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else env_rank()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else env_world_size()


def is_rank_zero() -> bool:
    return rank() == 0


# -- joining and leaving -----------------------------------------------------------------------
def resolve_backend(backend: str, device: torch.device) -> str:
    check_choice("trainer.dist_backend", backend, BACKENDS)
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise InputError(f"trainer.dist_backend=nccl needs CUDA devices, but this process uses {device}; use gloo")
    return backend


def setup(device: torch.device, backend: str = "auto", timeout_min: float = 30.0) -> bool:
    """Join the process group when launched by torchrun; returns True when this call created it
    (the caller then owns it and calls :func:`cleanup`). A second call is a no-op."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise InputError("launched with WORLD_SIZE > 1, but this torch build has no torch.distributed")
    backend = resolve_backend(backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # collectives of objects (nccl) use the current device
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min), **kwargs)
    if rank() == 0:
        log.info("distributed: %d processes, backend %s, rank 0 on %s", world_size(), backend, device)
    return True


def cleanup(created: bool) -> None:
    """Leave the process group if :func:`setup` created it."""
    if created and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the body first (e.g. generates or downloads data); the others wait, then run it."""
    if is_distributed() and not is_rank_zero():
        dist.barrier()
    try:
        yield
    finally:
        if is_distributed() and is_rank_zero():
            dist.barrier()


# -- collectives the trainer uses ----------------------------------------------------------------
def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects; a no-op for one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> List[Any]:
    """One object per rank, in rank order (``[obj]`` for one process)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(values: Dict[str, float], device: torch.device) -> Dict[str, float]:
    """The mean of each value over the ranks (each rank's value weighted equally)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any rank (stop signals must agree)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# -- one Hydra output folder for all ranks --------------------------------------------------------


class HydraRunDir(_HydraCallback):
    """A Hydra callback (``hydra.callbacks.distributed``) that makes every torchrun rank use rank
    0's output folder. Each rank runs ``@hydra.main``, and ``${now:...}`` in ``hydra.run.dir``
    can differ by a second between them; so, before Hydra creates the folder, the ranks join the
    process group, rank 0 resolves the folder and broadcasts it. Ranks other than 0 also skip
    ``.hydra/`` (``hydra.output_subdir=null``) and, once logging is configured, the ``train.log``
    file handler and INFO console lines. Does nothing for a single process.

    Multirun works with the basic sweeper and launcher (each job runs on all ranks, one after
    the other); the parallel launchers and the Optuna sweeper start single-process jobs and
    are refused under torchrun.
    """

    def __init__(self, device: str = "auto", backend: str = "auto", timeout_min: float = 30.0) -> None:
        self.device, self.backend, self.timeout_min = device, backend, float(timeout_min)
        self.created = False

    def _join(self) -> bool:
        if not launched_by_torchrun():
            return False
        self.created = setup(resolve_device(self.device), self.backend, self.timeout_min) or self.created
        return True

    def on_run_start(self, config, **kwargs) -> None:
        if not self._join():
            return
        run_dir = broadcast_object(str(config.hydra.run.dir) if is_rank_zero() else None)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = run_dir
            if not is_rank_zero():
                config.hydra.output_subdir = None

    def on_multirun_start(self, config, **kwargs) -> None:
        if not launched_by_torchrun():
            return
        names = {k: str(config.hydra[k]._target_).rsplit(".", 1)[-1] for k in ("sweeper", "launcher")}
        if names != {"sweeper": "BasicSweeper", "launcher": "BasicLauncher"}:
            raise InputError(f"under torchrun, multirun needs the basic sweeper and launcher (got {names['sweeper']}, "
                             f"{names['launcher']}); run the sweep without torchrun, or each job with torchrun")
        self._join()
        sweep_dir = broadcast_object(str(config.hydra.sweep.dir) if is_rank_zero() else None)
        # Each job's config is recomposed from these overrides, so that is where the folder goes.
        extra = [f"hydra.sweep.dir={_quote(sweep_dir)}"] + ([] if is_rank_zero() else ["hydra.output_subdir=null"])
        with read_write(config.hydra):
            config.hydra.sweep.dir = sweep_dir
            config.hydra.overrides.hydra = list(config.hydra.overrides.hydra) + extra

    def on_job_start(self, config, **kwargs) -> None:
        adopt_submitit_env()
        if launched_by_torchrun() and env_rank() != 0:
            quiet_non_zero_rank()

    def on_run_end(self, config, **kwargs) -> None:
        cleanup(self.created)
        self.created = False

    on_multirun_end = on_run_end


def adopt_submitit_env() -> bool:
    """Inside a submitit job of several tasks (``hydra/launcher=slurm`` with ``tasks_per_node``
    > 1), set torchrun's variables from SLURM's through submitit's own helper, so that the
    tasks train as one DDP job. Returns True when it did."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "LOCAL_RANK" in os.environ:
        return False
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return False
    env = TorchDistributedEnvironment()
    if env.world_size < 2:
        return False
    # Every task keeps every GPU of its node visible and picks cuda:LOCAL_RANK itself.
    env.export(set_cuda_visible_devices=False)
    return True


def _quote(value: str) -> str:
    """A Hydra override value that stays one string whatever it contains (commas, '=', spaces)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quiet_non_zero_rank() -> None:
    """Ranks other than 0 write no log file and print warnings and errors only."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
        else:
            handler.setLevel(logging.WARNING)


# -- sweep jobs sharing one machine ---------------------------------------------------------------
def job_resources(job_num: int, parallel_jobs: int, gpus: int, cpus: int) -> Tuple[Optional[int], int]:
    """Where one of ``parallel_jobs`` jobs running at once on one machine should run: the GPU
    index (round robin over the ``gpus`` visible devices; ``None`` without GPUs) and its share of
    the ``cpus`` cores as torch threads (at least 1). Jobs that each took every core would thrash:
    on a 2-core machine an epoch that took 12 s alone took 80 s beside one other busy job."""
    if parallel_jobs < 1 or job_num < 0:
        raise InputError(f"job {job_num} of {parallel_jobs} parallel jobs")
    gpu = job_num % gpus if gpus > 0 else None
    return gpu, max(1, cpus // parallel_jobs)


def joblib_parallel_jobs(n_jobs: int, cpus: int) -> int:
    """How many jobs joblib runs at once for its ``n_jobs`` (-1: one per core; -k: cores + 1 - k)."""
    return max(1, n_jobs if n_jobs > 0 else cpus + 1 + n_jobs)


def place_sweep_job(cfg) -> Optional[str]:
    """Under ``hydra/launcher=local_parallel`` (joblib), give this job its GPU and its share of the
    CPU cores by setting ``trainer.device`` (when it is ``auto`` or ``cuda`` without an index and
    CUDA is available) and ``trainer.num_threads`` (when unset) in the job's config. Returns the
    line to log, or ``None`` for any other launcher (each job then uses the config as given)."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # not started by @hydra.main
        return None
    target = str(hydra_cfg.launcher.get("_target_", ""))
    if not target.endswith("JoblibLauncher") or hydra_cfg.job.get("num") is None:
        return None
    cpus = os.cpu_count() or 1
    parallel = joblib_parallel_jobs(int(hydra_cfg.launcher.get("n_jobs", 1)), cpus)
    job = int(hydra_cfg.job.num)
    wants_cuda = str(cfg.trainer.device) in ("auto", "cuda") and torch.cuda.is_available()
    gpu, threads = job_resources(job, parallel, torch.cuda.device_count() if wants_cuda else 0, cpus)
    with open_dict(cfg):
        if gpu is not None:
            cfg.trainer.device = f"cuda:{gpu}"
        if cfg.trainer.get("num_threads") is None:
            cfg.trainer.num_threads = threads
    return (f"sweep job {job} ({parallel} at once on this machine): device {cfg.trainer.device}, "
            f"{cfg.trainer.num_threads} CPU thread(s) of {cpus} cores")
