"""Data-parallel training (torchrun + DDP, gloo on the CPU): two processes on the same global batch
give the weights of one process, validation sharded over ranks gives the single-process metrics,
all ranks share rank 0's Hydra folder, only rank 0 writes, and resume works under torchrun."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from regkit import distributed
from regkit.experiment import build
from regkit.training import load_checkpoint
from regkit.training.callbacks import Validation
from regkit.data.module import train_sampler
from tests.conftest import ROOT, TINY_DATA, compose

# 4 training pairs: 2 steps per epoch at global batch 2 (1 per rank on 2 ranks), 2 epochs; no files.
# Plain SGD, whose update is linear in the gradient: Adam divides by sqrt(v), which turns float32
# round-off in near-zero gradient entries into full-size steps and would hide what is compared.
EQUIV = TINY_DATA + ["dataset.n_train=4", "dataset.n_val=3", "trainer.max_epochs=2", "~logger",
                     "callbacks.checkpoint=null", "callbacks.validation=null", "trainer.warmup_steps=0",
                     "optimizer._target_=torch.optim.SGD", "~optimizer.betas", "~optimizer.amsgrad", "optimizer.lr=0.1"]
# Float32 tolerance, relative to the size of the weight update: one step agrees to ~4e-7; batch
# 2 vs two batches of 1 round differently in the convolutions and the LNCC sums, and 4 steps
# amplify that to 3e-4 (measured; a single process that averages per-sample gradients
# by hand gives the same 3e-4, so it is the arithmetic, not DDP).
REL_TOL = 2e-3


def relative_update_error(state, ref_state, init):
    diff = torch.cat([(state[k] - ref_state[k]).flatten() for k in init])
    update = torch.cat([(ref_state[k] - init[k]).flatten() for k in init])
    return float(diff.norm() / update.norm())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(overrides, out_dir, data_dir):
    cfg = compose(overrides, output_dir=out_dir, data_dir=data_dir)
    parts = build(cfg)
    trainer = parts["trainer"]
    trainer.fit(parts["model"], parts["loss"], parts["optimizer"], parts["data"])
    return parts, trainer


def _ddp_worker(rank, world, port, overrides, data_dir, out_dir, init_weights):
    """One torchrun-like process: the env contract of torchrun, then the ordinary trainer."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # Joined here (as the Hydra callback does for train.py), so the group outlives fit().
    created = distributed.setup(torch.device("cpu"))
    assert created and distributed.is_distributed() and distributed.rank() == rank
    parts, trainer = _train(overrides + ["dataset.batch_size=1"], out_dir, data_dir)
    result = {"state": {k: v.clone() for k, v in parts["model"].state_dict().items()}, "steps": trainer.global_step,
              "epoch_loss": trainer.metrics["train/epoch_loss/total"]}
    # Sharded validation of known weights (the initial ones), gathered in pair order.
    parts["model"].load_state_dict(init_weights)
    result["val"] = Validation(log_images=False).evaluate(trainer)
    result["val_identity"] = Validation(log_images=False).evaluate(trainer, identity=True)
    # both processes finish their last collective before either closes its connections (as Trainer.fit
    # does at its end): tearing the group down under a peer's last gather made gloo abort it once in CI
    distributed.barrier()
    distributed.cleanup(created)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def test_two_gloo_processes_equal_one_process_on_the_global_batch(tmp_path, data_dir):
    ref_parts, ref = _train(EQUIV + ["dataset.batch_size=2"], tmp_path / "single", data_dir)
    init = build(compose(EQUIV, output_dir=tmp_path / "x", data_dir=data_dir))["model"].state_dict()

    mp.spawn(_ddp_worker, args=(2, free_port(), EQUIV, str(data_dir), str(tmp_path), init), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    assert ref.global_step == 4 and all(r["steps"] == 4 for r in ranks)
    ref_state = ref_parts["model"].state_dict()
    for r in ranks:
        assert relative_update_error(r["state"], ref_state, init) < REL_TOL
        for k in init:  # and tensor by tensor, down to the float32 spacing of the weights
            update = (ref_state[k] - init[k]).abs().max()
            assert (r["state"][k] - ref_state[k]).abs().max() <= 1e-7 + REL_TOL * update, k
    # The tolerance can fail: training on half of each global batch (what a rank without the
    # gradient all-reduce does) lands far outside it.
    _, half = _train(EQUIV + ["dataset.batch_size=1", "dataset.n_train=2"], tmp_path / "half", data_dir)
    assert relative_update_error(half.model.state_dict(), ref_state, init) > 50 * REL_TOL

    # the ranks hold identical weights (DDP) and log the global-batch loss (mean over ranks)
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in init)
    assert ranks[0]["epoch_loss"] == pytest.approx(ref.metrics["train/epoch_loss/total"], rel=1e-5, abs=1e-6)
    assert ranks[0]["epoch_loss"] == ranks[1]["epoch_loss"]

    # sharded validation (3 pairs over 2 ranks) = one process over all pairs, on every rank
    ref_parts["model"].load_state_dict(init)
    single_val = Validation(log_images=False).evaluate(ref)
    single_identity = Validation(log_images=False).evaluate(ref, identity=True)
    for r in ranks:
        assert r["val_identity"] == single_identity
        assert set(r["val"]) == set(single_val)
        for key, value in single_val.items():
            assert r["val"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_sampler_shards_the_single_process_permutation(monkeypatch):
    """regkit's train sampler on rank r of W: global step k holds the single process's batch k
    (batch W*b); the epoch has the single process's number of steps; epochs reshuffle."""
    from regkit.data.pairs import EpochSampler

    n, world, batch = 11, 2, 2
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    orders = []
    for epoch in range(3):
        single = EpochSampler(n, True, seed=5)
        single.set_epoch(epoch)
        order = [i for _, i in single]
        orders.append(order)
        shards = []
        for rank in range(world):
            monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
            sampler = train_sampler(n, seed=5)
            sampler.set_epoch(epoch)
            shards.append([i for _, i in sampler])
        assert all(len(s) == n // world for s in shards)
        steps = (n // world) // batch
        assert steps == n // (world * batch)
        for k in range(steps):
            global_batch = sorted(sum((s[k * batch:(k + 1) * batch] for s in shards), []))
            assert global_batch == sorted(order[k * world * batch:(k + 1) * world * batch])
    assert orders[0] != orders[1] != orders[2]


def _torchrun(*args, cwd, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def scalar_steps(event_dir: Path, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_torchrun_resumes_in_one_folder_written_by_rank_zero(tmp_path, data_dir):
    from regkit.experiment import train

    common = TINY_DATA + ["dataset.n_train=4", "dataset.n_val=3", "trainer.log_every_n_steps=1"]
    first = tmp_path / "first"
    train(compose(common + ["dataset.batch_size=2", "trainer.max_epochs=1"], output_dir=first, data_dir=data_dir))  # 2 steps

    # A run folder that differs per rank unless the ranks agree on rank 0's: Hydra creates it
    # on every rank, so a folder rank1/ would prove a rank wrote elsewhere.
    res = _torchrun(*common, "dataset.batch_size=1", "trainer.max_epochs=2", f"paths.data_dir={data_dir}",
                    f"ckpt_path={first}/checkpoints/last.ckpt", f"hydra.run.dir={tmp_path}/runs/rank" + "${oc.env:RANK}",
                    cwd=tmp_path)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["rank0"]
    run = tmp_path / "runs" / "rank0"
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "checkpoints", "tensorboard", "train.log"]
    assert len(list((run / "tensorboard").iterdir())) == 1  # one event file: rank 0's
    log_text = (run / "train.log").read_text()
    assert log_text.count("resumed from") == 1 and log_text.count("epoch 2/2") == 1
    assert "distributed: 2 processes, backend gloo" in text

    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    # resumed at epoch 1 / step 2, then one epoch of 2 steps (4 pairs, batch 1 on each of 2 ranks)
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 4
    assert int(next(iter(ckpt["optimizer"]["state"].values()))["step"]) == 4
    assert scalar_steps(run / "tensorboard", "time/epoch") == [2]
    assert scalar_steps(run / "tensorboard", "train/loss/total") == [3, 4]
    assert 0.0 < ckpt["metrics"]["val/dice"] <= 1.0


def test_submitit_tasks_become_torchrun_ranks(monkeypatch):
    """hydra/launcher=slurm with tasks_per_node > 1: each task gets torchrun's variables from
    SLURM's (through submitit's helper), so the trainer runs DDP."""
    pytest.importorskip("submitit")
    # submitit's export writes os.environ: let it write a copy that is dropped after the test
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")})
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
                       "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NODEID": "1"}.items():
        monkeypatch.setenv(key, value)
    assert distributed.adopt_submitit_env()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("3", "1", "4")
    assert os.environ["MASTER_ADDR"] == "gpu07"
    assert distributed.launched_by_torchrun() and distributed.env_world_size() == 4
    assert not distributed.adopt_submitit_env()  # already set: left alone


def test_the_tests_leave_no_torchrun_variables():
    """Guard: a leaked LOCAL_RANK/WORLD_SIZE would make every later test try to join a group."""
    assert not distributed.launched_by_torchrun()


def test_single_process_is_untouched(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SUBMITIT_EXECUTOR"):
        monkeypatch.setenv(key, "0")  # recorded, so that the delenv below is undone after the test
        monkeypatch.delenv(key)
    assert not distributed.launched_by_torchrun() and not distributed.adopt_submitit_env()
    assert not distributed.setup(torch.device("cpu")) and train_sampler(5, 0) is None
    assert distributed.mean_over_ranks({"a": 1.5}, torch.device("cpu")) == {"a": 1.5}


def test_distributed_errors_are_clear(monkeypatch):
    from regkit.device import resolve_device

    with pytest.raises(ValueError, match="Unknown trainer.dist_backend 'mpi'. Valid: auto, gloo, nccl"):
        distributed.resolve_backend("mpi", torch.device("cpu"))
    with pytest.raises(ValueError, match="nccl needs CUDA"):
        distributed.resolve_backend("nccl", torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    with pytest.raises(ValueError, match="the training split has 1 pairs, fewer than the 2 processes"):
        train_sampler(1, 0)
    if not torch.cuda.is_available():
        monkeypatch.setenv("LOCAL_RANK", "0")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.slow
def test_torchrun_multirun_shares_one_sweep_folder(tmp_path, data_dir):
    common = TINY_DATA + ["dataset.n_train=4", "dataset.n_val=3", "dataset.batch_size=1", "trainer.max_epochs=1"]
    res = _torchrun("-m", "model=vxm1,vxm2", *common, f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path}/logs",
                    cwd=tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    sweeps = list((tmp_path / "logs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1  # one folder although each rank resolved ${now:...} itself
    for num, model in ((0, "vxm1"), (1, "vxm2")):
        job = sweeps[0] / str(num)
        assert len(list((job / "tensorboard").iterdir())) == 1
        assert (job / "train.log").read_text().count("validation Dice:") == 1
        assert load_checkpoint(job / "checkpoints" / "last.ckpt")["model"]["name"] == model


def test_torchrun_refuses_launchers_that_start_their_own_processes(monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "setup", lambda *a, **k: False)
    config = OmegaConf.create({"hydra": {
        "sweeper": {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"},
        "launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}}})
    with pytest.raises(ValueError, match="under torchrun, multirun needs the basic sweeper and launcher "
                                         r"\(got OptunaSweeper, BasicLauncher\)"):
        distributed.HydraRunDir(device="cpu").on_multirun_start(config)
