"""The generalisation comparison's scoring (regkit/bench/generalise.py): the held-out pair and the
development pair are read and scored as documented (their unregistered Dice are the figures of
../shared/data/real/README.md), and the table states its conditions."""
import importlib.util
from pathlib import Path

import pytest
import torch

from regkit.bench import generalise
from regkit.checkpoint import model_spec, save_checkpoint
from regkit.errors import MissingFileError
from regkit.models import create_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "generalise_compare.py"


def compare_main(argv):
    spec = importlib.util.spec_from_file_location("generalise_compare", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.main(argv)


@pytest.fixture(scope="module")
def identity_checkpoint(tmp_path_factory):
    """An untrained VoxelMorph-1 at 40x48x56 whose field is exactly zero (its flow head zeroed)."""
    model = create_model("vxm1")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    path = tmp_path_factory.mktemp("ckpt") / "zero.ckpt"
    save_checkpoint(path, {"model": model_spec(model), "state_dict": model.state_dict(), "config": {},
                           "data": {"normalize": "percentile", "shape": [40, 48, 56]}})
    return path


@pytest.mark.realdata
def test_zero_field_scores_the_documented_unregistered_dice(real_data, identity_checkpoint):
    held = generalise.score_checkpoint(identity_checkpoint, real_data)
    assert abs(held["dice_before"] - 0.611) < 5e-4 and abs(held["dice"] - held["dice_before"]) < 1e-12
    assert held["nonpos_jac_pct"] == 0
    proxy = generalise.score_proxy(identity_checkpoint, real_data)
    assert abs(proxy["proxy_dice_before"] - 0.767) < 5e-4 and proxy["proxy_dice"] == proxy["proxy_dice_before"]


def test_missing_data_and_bad_runs_fail_in_one_line(tmp_path, capsys):
    with pytest.raises(MissingFileError, match="held-out pair not found"):
        generalise.held_out_paths(tmp_path)
    with pytest.raises(MissingFileError, match="not a finished training run"):
        generalise.run_summary(tmp_path)
    with pytest.raises(SystemExit):
        compare_main(["--run", "nonsense=folder", "--real-root", str(tmp_path)])
    assert "RECIPE=RUN_DIR" in capsys.readouterr().err


def test_the_table_marks_what_beats_affine_and_states_its_conditions():
    row = generalise.Row("real_generalise", "r", "images", "python train.py experiment=real_generalise", "run", 1200,
                         600.0, 0.001, 0.65, 0.611, 0.01, 0.2, 0.78, 0.767)
    worse = generalise.Row("old", "o", "images", "python train.py x", "run2", 1200, 600.0, 0.0, 0.55, 0.611, 0.0, 0.1,
                           0.70, 0.767)
    text = generalise.markdown([row, worse], "scripts/generalise_compare.py")
    assert "**0.650**" in text and "| 0.550 |" in text and "10.0 min" in text
    assert "load average" in text and "`python train.py experiment=real_generalise`" in text
