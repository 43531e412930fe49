"""Hydra sweeps: a multirun with the basic launcher writes one folder per job; the local-parallel
(joblib) and SLURM (submitit) launcher configs compose; the Optuna search maximises the metric
that train.py returns."""
import subprocess
import sys

import pytest
import yaml
from hydra import compose as hydra_compose, initialize_config_dir

from regkit.training import load_checkpoint
from tests.conftest import CONFIG_DIR, ROOT, TINY_DATA

QUICK = TINY_DATA + ["trainer.max_epochs=1", "callbacks.validation.log_images=false"]


def _cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def compose_hydra(overrides):
    """The config with its ``hydra`` node, as ``train.py -m <overrides>`` sees it."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def test_multirun_writes_one_folder_per_job(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    res = _cli("-m", "model=vxm1,vxm2", *QUICK, f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert (sweep / "multirun.yaml").is_file()
    for num, model in ((0, "vxm1"), (1, "vxm2")):
        job = sweep / str(num)
        assert f"model={model}" in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert len(list((job / "tensorboard").glob("events.out.tfevents.*"))) == 1
        assert "validation Dice:" in (job / "train.log").read_text()
        ckpt = load_checkpoint(job / "checkpoints" / "last.ckpt")
        assert ckpt["model"]["name"] == model and ckpt["epoch"] == 1


def _importable(target: str):
    import importlib

    module, name = target.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def test_slurm_launcher_config_is_valid_for_its_plugin(tmp_path):
    """The config composes, names a class that exists, and fills every field of the plugin's own
    config schema (a misspelt key or a missing value would fail here, not on the cluster)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    from omegaconf import OmegaConf

    cfg = compose_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}"])
    launcher = cfg.hydra.launcher
    _importable(launcher._target_)
    schema = OmegaConf.structured(SlurmQueueConf)
    merged = OmegaConf.merge(schema, OmegaConf.to_container(launcher, resolve=True))
    assert set(launcher) <= set(schema) and merged.partition == "gpu"
    assert str(merged.submitit_folder).startswith(str(tmp_path))  # submitit's logs land in the sweep folder


def test_optuna_search_space_names_real_config_keys():
    """Every searched parameter is a key of the composed run config (a typo would silently search
    nothing), the metric it maximises is one train.py returns, and the sampler can be built."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose_hydra(["hparams_search=optuna"])
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key, throw_on_missing=True) is not None, key
    assert cfg.optimized_metric == "val/dice" and cfg.hydra.sweeper.direction == "maximize"
    sampler = instantiate(cfg.hydra.sweeper.sampler)
    assert type(sampler).__name__ == "TPESampler"


@pytest.mark.slow
def test_optuna_search_maximises_the_returned_metric(tmp_path, data_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    res = _cli("hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
               *QUICK, "trainer.limit_train_batches=1", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}",
               cwd=tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    dices = [load_checkpoint(sweep / str(n) / "checkpoints" / "last.ckpt")["metrics"]["val/dice"] for n in (0, 1)]
    assert result["best_value"] == pytest.approx(max(dices))
    assert set(result["best_params"]) == {"loss.terms.grad.weight", "optimizer.lr"}
    lrs = [yaml.safe_load((sweep / str(n) / ".hydra" / "config.yaml").read_text())["optimizer"]["lr"] for n in (0, 1)]
    assert 1e-5 <= min(lrs) and max(lrs) <= 1e-2 and lrs[0] != lrs[1]  # sampled from the search space


@pytest.mark.parametrize("job, parallel, gpus, cpus, expected", [
    (0, 4, 4, 16, (0, 4)), (3, 4, 4, 16, (3, 4)),   # the Baskerville case: four jobs on four GPUs
    (5, 4, 4, 16, (1, 4)),                           # round robin beyond the visible devices
    (1, 2, 0, 2, (None, 1)),                         # a 2-core CPU: one thread each, no thrashing
    (0, 8, 1, 4, (0, 1)),                            # never fewer than one thread
])
def test_parallel_jobs_get_their_own_gpu_and_cpu_share(job, parallel, gpus, cpus, expected):
    from regkit.distributed import job_resources, joblib_parallel_jobs

    assert job_resources(job, parallel, gpus, cpus) == expected
    assert joblib_parallel_jobs(-1, 16) == 16 and joblib_parallel_jobs(-2, 16) == 15 and joblib_parallel_jobs(2, 16) == 2


def test_local_parallel_sweep_records_each_jobs_share(tmp_path, data_dir):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    import os

    sweep = tmp_path / "sweep"
    res = _cli("-m", "hydra/launcher=local_parallel", "model=vxm1,vxm2", *QUICK, "trainer.limit_train_batches=1",
               f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    threads = max(1, (os.cpu_count() or 1) // 2)
    for num in (0, 1):
        log = (sweep / str(num) / "train.log").read_text()
        assert f"sweep job {num} (2 at once on this machine): device cpu, {threads} CPU thread(s)" in log
