"""The checkpoints shipped inside the package (regkit/pretrained.py, regkit/weights/): each loads
as plain data (weights_only), is the file its metadata describes, and is reachable by name from
regkit-register. Nothing here trains: the files are checked as shipped."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose
from regkit.checkpoint import load_checkpoint, model_from_checkpoint
from regkit.cli.register import main as register_main
from regkit.data.io import save_nifti
from regkit.errors import InputError
from regkit.experiment import train
from regkit.predictor import Predictor, TrainingSpec
from regkit.pretrained import PRETRAINED, export, list_pretrained, pretrained_info, pretrained_path, same_weights, sha256

ROOT = Path(__file__).resolve().parents[1]


def test_something_is_shipped_and_declared_as_package_data():
    assert "synth-brain" in list_pretrained()
    text = (ROOT / "pyproject.toml").read_text()
    assert '"weights/*.ckpt"' in text  # so that pip installs the files with the package


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_shipped_file_loads_safely_and_matches_its_metadata(name):
    info = pretrained_info(name)
    path = pretrained_path(name)
    assert sha256(path) == info.sha256
    # plain data: torch.load with weights_only=True, no optimizer or resume state
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert "optimizer" not in raw and "rng" not in raw
    data = load_checkpoint(path)
    model = model_from_checkpoint(data)
    assert data["model"]["name"] == info.model
    assert sum(p.numel() for p in model.parameters()) == info.parameters
    spec = TrainingSpec.from_checkpoint(data)
    assert list(spec.shape) == list(info.shape) and spec.normalize == info.normalize
    record = data["pretrained"]
    assert (record["name"], record["command"], record["seed"], record["commit"]) == (name, info.command, info.seed,
                                                                                     info.commit)
    assert data["config"]["seed"] == info.seed and record["torch"].startswith("2.")
    # it registers: a pair of its own training size gives a finite field
    predictor = Predictor.from_checkpoint(path)
    x = torch.rand(1, 1, *info.shape)
    assert torch.isfinite(predictor(x, x.flip(2)).flow).all()


def test_names_are_checked_and_the_cli_takes_model(tmp_path, capsys):
    with pytest.raises(InputError, match="Unknown pretrained model 'synth-brian'.*synth-brain"):
        pretrained_path("synth-brian")
    shape = tuple(pretrained_info("synth-brain").shape)
    rng = np.random.default_rng(0)
    for name in ("m", "f"):
        save_nifti(tmp_path / f"{name}.nii.gz", rng.random(shape).astype(np.float32), np.eye(4))
    assert register_main(["--model", "synth-brain", str(tmp_path / "m.nii.gz"), str(tmp_path / "f.nii.gz"),
                          "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "flow_voxel.nii.gz").is_file()
    with pytest.raises(SystemExit):  # a file and --model: ambiguous
        register_main([str(pretrained_path("synth-brain")), str(tmp_path / "m.nii.gz"), str(tmp_path / "f.nii.gz"),
                       "--model", "synth-brain", "-o", str(tmp_path / "o2")])
    assert "not both" in capsys.readouterr().err


def test_export_keeps_weights_and_drops_the_resume_state(tmp_path):
    shipped = pretrained_path("synth-brain")
    data = load_checkpoint(shipped)
    out = export(shipped, tmp_path / "again.ckpt", "synth-brain", data["pretrained"]["command"], 0, commit="abc")
    assert same_weights(out, shipped)
    assert load_checkpoint(out)["pretrained"]["commit"] == "abc"
    # the command line: compare says whether weights are the same, bit for bit
    run = subprocess.run([sys.executable, "-m", "regkit.cli.pretrained", "compare", str(out), "synth-brain"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and "the same weights" in run.stdout


@pytest.mark.slow  # two short trainings of the shipped recipe (~1 min on 2 cores)
def test_the_shipped_recipe_trains_bit_for_bit_the_same_twice(tmp_path, real_data):
    """The shipped model's command is deterministic (one main thread, seeded synthesis in one loader
    worker): two runs of its first steps give bitwise the same weights."""
    runs = []
    for name in ("a", "b"):
        cfg = compose(["experiment=synth_brain", "dataset.length=3", "trainer.max_epochs=1", "~logger",
                       "callbacks.progress.enabled=false", f"dataset.label_maps=[{real_data}/oasis_lapirn_160x192x144/"
                       f"image_A_160x192x144_seg_affinefixed.nii.gz,{real_data}/oasis_lapirn_160x192x144/"
                       f"image_B_160x192x144_seg.nii.gz]"], output_dir=tmp_path / name)
        train(cfg)
        runs.append(tmp_path / name / "checkpoints" / "last.ckpt")
    assert same_weights(*runs)
    assert not same_weights(runs[0], pretrained_path("synth-brain"))  # 3 steps are not the shipped 800
