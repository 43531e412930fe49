"""End to end: Hydra composition, a 1-epoch CPU run that logs timing and writes checkpoints,
resume, and the command-line errors a user meets first."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from regkit.experiment import build, train
from regkit.training import load_checkpoint, load_model, save_checkpoint
from tests.conftest import ROOT, TINY_DATA, compose


def scalars(event_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_compose_the_readme_command():
    cfg = compose(["model=vxm2", "loss=lncc_group", "trainer.max_epochs=2"], output_dir="/tmp/x")
    assert cfg.model._target_.endswith("vxm2") and cfg.trainer.max_epochs == 2
    assert set(cfg.loss.terms) == {"lncc_group", "grad"}
    for group in ("dataset", "model", "loss", "optimizer", "trainer", "logger", "paths"):
        assert group in cfg


def test_unknown_group_option_lists_choices():
    with pytest.raises(MissingConfigException) as err:
        compose(["model=vxm9"], output_dir="/tmp/x")
    assert "vxm1" in str(err.value) and "vxm2" in str(err.value)


def test_typo_in_key_is_rejected():
    with pytest.raises(ConfigCompositionException, match="max_epoch"):
        compose(["trainer.max_epoch=2"], output_dir="/tmp/x")


def test_one_epoch_then_resume(tmp_path, data_dir):
    out = tmp_path / "run"
    overrides = TINY_DATA + ["trainer.max_epochs=1", "trainer.log_every_n_steps=1", "loss=lncc_group"]
    metrics = train(compose(overrides, output_dir=out, data_dir=data_dir))
    assert 0.0 < metrics["val/dice"] <= 1.0 and "val/dice_before" in metrics

    events = scalars(out / "tensorboard")
    assert [s for s, _ in events["time/epoch"]] == [1] and events["time/epoch"][0][1] > 0
    for tag in ("time/data", "time/forward", "time/loss", "time/backward", "time/optimizer",
                "time/data_share", "train/loss/lncc_group", "train/loss/grad", "train/loss/total", "val/dice"):
        assert tag in events, tag
    ckpt = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 3
    assert ckpt["model"]["name"] == "vxm1" and ckpt["config"]["trainer"]["max_epochs"] == 1
    assert set(ckpt["optimizer"]) == {"state", "param_groups"}
    assert (out / "checkpoints" / "best.ckpt").exists()

    out2 = tmp_path / "resumed"
    resume = overrides[:-2] + ["trainer.max_epochs=2", "loss=lncc_group", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"]
    cfg = compose(resume, output_dir=out2, data_dir=data_dir)
    parts = build(cfg)
    trainer = parts["trainer"]
    trainer.fit(parts["model"], parts["loss"], parts["optimizer"], parts["data"], ckpt_path=cfg.ckpt_path)
    assert trainer.epoch == 2 and trainer.global_step == 6
    assert [s for s, _ in scalars(out2 / "tensorboard")["time/epoch"]] == [2]  # only epoch 2 ran
    resumed = load_checkpoint(out2 / "checkpoints" / "last.ckpt")
    assert resumed["epoch"] == 2
    # the optimizer state continued: Adam's step counter went from 3 to 6
    assert int(next(iter(resumed["optimizer"]["state"].values()))["step"]) == 6
    model = load_model(out2 / "checkpoints" / "last.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trainer.model.state_dict().values()))


def test_resume_with_other_model_is_rejected(tmp_path, data_dir):
    out = tmp_path / "run"
    train(compose(TINY_DATA + ["trainer.max_epochs=1", "~logger"], output_dir=out, data_dir=data_dir))
    cfg = compose(TINY_DATA + ["model=vxm2", f"ckpt_path={out}/checkpoints/last.ckpt"], output_dir=tmp_path / "b",
                  data_dir=data_dir)
    with pytest.raises(ValueError, match="resuming cannot change the model or the data, but model._target_ "
                                         "\\('regkit.models.voxelmorph.vxm1' -> 'regkit.models.voxelmorph.vxm2'\\)"):
        train(cfg)


class RunsCode:
    """What a crafted checkpoint would carry: unpickling it calls os.system."""

    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("payload, named", [
    (Path("/etc"), "pathlib"),                           # torch 2.13: "Unsupported global: GLOBAL pathlib..."
    (RunsCode(), "posix.system"),                        # torch 2.13: "unsupported GLOBAL posix.system whose module..."
    (torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
])
def test_checkpoint_load_never_unpickles_code(tmp_path, monkeypatch, payload, named):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"format": "regkit-checkpoint-v1", "payload": payload}, path)
    with pytest.raises(ValueError, match="not a regkit checkpoint") as err:
        load_checkpoint(path)
    message = str(err.value)
    assert named in message and "not plain data" in message and "\n" not in message
    assert "weights_only" not in message and "trust" not in message  # no advice to turn the safety off
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_refusals_of_other_files(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.ckpt: not a regkit checkpoint .not a file written by torch.save"):
        load_checkpoint(garbage)
    with pytest.raises(FileNotFoundError, match="missing.ckpt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "last.ckpt", {"epoch": 1})

    def crash(obj, f):
        Path(f).write_bytes(b"half")
        raise OSError("killed")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "last.ckpt", {"epoch": 2})
    assert load_checkpoint(tmp_path / "last.ckpt")["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True)


def test_cli_trains_and_reports(tmp_path, data_dir):
    res = _cli(*TINY_DATA, "trainer.max_epochs=1", f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}/run",
               cwd=tmp_path)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-2000:]
    assert "validation Dice:" in text and "before (unregistered)" in text
    assert f"{tmp_path}/run/checkpoints/best.ckpt" in text
    assert "tensorboard --logdir" in text


def test_cli_bad_input_is_one_line(tmp_path, data_dir):
    res = _cli(*TINY_DATA, "ckpt_path=nowhere/last.ckpt", f"paths.data_dir={data_dir}",
               f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("regkit: error:")]
    assert errors == ["regkit: error: nowhere/last.ckpt: checkpoint not found"]
    assert "Traceback" not in res.stderr


def test_cli_unknown_model(tmp_path):
    res = _cli("model=lkunett", cwd=tmp_path)
    assert res.returncode != 0
    assert "Could not find 'model/lkunett'" in res.stderr and "vxm1" in res.stderr
