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


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 4, 1)
    assert launcher.timeout_min == 1440 and launcher.array_parallelism == 16
    assert str(launcher.submitit_folder).endswith("/.submitit/%j")


def test_local_parallel_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    cfg = compose_hydra(["hydra/launcher=local_parallel"])
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert cfg.hydra.launcher.n_jobs == 2 and cfg.hydra.launcher.backend == "loky"


def test_optuna_search_config_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_hydra(["hparams_search=optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "maximize" and cfg.optimized_metric == "val/dice"
    assert set(sweeper.params) == {"loss.terms.grad.weight", "optimizer.lr"}
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"


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
