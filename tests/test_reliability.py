"""Reliability: no silent garbage, no lost or colliding runs, honest resume, safe one-line errors.
One test (or a few) per failure a tester found; each failed before its fix."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch

import regkit
from regkit.checkpoint import load_checkpoint, model_spec, save_checkpoint
from regkit.cli import evaluate as evaluate_cli
from regkit.cli import register as register_cli
from regkit.data.io import TEMP_MARK, atomic_write, check_output_folder
from regkit.errors import InputError, TrainingError
from regkit.experiment import build, resolve_ckpt_path, train, unique_dir
from regkit.inference import register_files
from regkit.training import Callback
from regkit.training.callbacks import PANEL_COLUMNS, Checkpoint, DivergenceWarning, slice_panel
from regkit.training.trainer import StopSignals
from tests.conftest import ROOT, TINY_DATA, compose

SHAPE = (24, 20, 28)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


def _blob(seed, shape=SHAPE):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.avg_pool3d(torch.randn(1, 1, *shape, generator=gen), 5, 1, 2)[0, 0].numpy()


@pytest.fixture(scope="module")
def uint8_scans(tmp_path_factory):
    """Two scans as uint8 files (0-249, like the real data) with label maps."""
    d = tmp_path_factory.mktemp("uint8")
    out = {}
    for name, seed in (("moving", 1), ("fixed", 2)):
        b = _blob(seed)
        img = ((b - b.min()) / (b.max() - b.min()) * 249).astype(np.uint8)
        nib.save(nib.Nifti1Image(img, AFFINE), str(d / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image((np.digitize(b, [-0.05, 0.05]) * 2).astype(np.uint8), AFFINE),
                 str(d / f"{name}_seg.nii.gz"))
        out[name], out[f"{name}_label"] = d / f"{name}.nii.gz", d / f"{name}_seg.nii.gz"
    return out


def _checkpoint(path, bias=(0.0, 0.0, 0.0), normalize="none", intensity=(0.0, 1.0)):
    """A vxm1 checkpoint trained (as recorded) on [0, 1] images with normalize: none, like the
    main job's; ``bias`` sets the flow head's output (a plain translation in voxels) and a
    sensitivity to the input intensities (weights), so that out-of-range inputs change the field."""
    torch.manual_seed(0)
    model = regkit.create_model("vxm1")
    with torch.no_grad():
        head = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)][-1]
        head.weight.normal_(0, 0.05)
        head.bias.copy_(torch.tensor(bias))
    save_checkpoint(path, {"model": model_spec(model), "state_dict": model.state_dict(), "epoch": 1,
                           "config": {}, "data": {"normalize": normalize, "shape": list(SHAPE),
                                                  "eval_labels": [2, 4], "intensity": list(intensity)}})
    return path


# -- 1. silent garbage ------------------------------------------------------------------------------
def test_scans_outside_the_training_range_are_rescaled_and_said_so(tmp_path, uint8_scans):
    ckpt = _checkpoint(tmp_path / "net.ckpt")
    s = uint8_scans
    r = register_files(ckpt, s["moving"], s["fixed"], tmp_path / "out", s["moving_label"], s["fixed_label"],
                       device="cpu", progress=False)
    notes = [n for n in r["notes"] if "far outside the training range" in n]
    assert len(notes) == 2 and all("rescaled" in n for n in notes)
    assert json.loads((tmp_path / "out" / "register.json").read_text())["notes"] == r["notes"]
    # the rescaled input equals the [0, 1] scan the network was trained for: same field
    same = tmp_path / "unit"
    same.mkdir()
    for key in ("moving", "fixed"):
        data = nib.load(str(s[key])).get_fdata(dtype=np.float32)
        lo, hi = np.percentile(data, [0.5, 99.5])
        nib.save(nib.Nifti1Image(((data - lo) / (hi - lo)).astype(np.float32), AFFINE), str(same / f"{key}.nii.gz"))
    r2 = register_files(ckpt, same / "moving.nii.gz", same / "fixed.nii.gz", tmp_path / "out2", device="cpu")
    assert not any("outside" in n for n in r2["notes"])
    f1 = nib.load(str(tmp_path / "out" / "flow_voxel.nii.gz")).get_fdata()
    f2 = nib.load(str(tmp_path / "out2" / "flow_voxel.nii.gz")).get_fdata()
    assert np.abs(f1 - f2).max() < 1e-4


def test_out_of_range_scans_can_be_refused_in_one_line(tmp_path, uint8_scans):
    ckpt = _checkpoint(tmp_path / "net.ckpt")
    with pytest.raises(InputError, match=r"moving.nii.gz: intensities \[.*\] after the recorded normalisation 'none' "
                                         r"lie far outside the training range \[0, 1\]; pass --intensity rescale") as err:
        register_files(ckpt, uint8_scans["moving"], uint8_scans["fixed"], tmp_path / "out", device="cpu",
                       intensity="error")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_a_result_worse_than_no_registration_is_flagged(tmp_path, uint8_scans, capsys):
    ckpt = _checkpoint(tmp_path / "bad.ckpt", bias=(6.0, -5.0, 7.0))  # a large shift: labels land elsewhere
    s = uint8_scans
    args = [str(ckpt), str(s["moving"]), str(s["fixed"]), "-o", str(tmp_path / "out"), "--moving-label",
            str(s["moving_label"]), "--fixed-label", str(s["fixed_label"]), "--device", "cpu"]
    assert register_cli.main(args) == 0
    record = json.loads((tmp_path / "out" / "register.json").read_text())
    assert record["dice"] < record["dice_before"] - 0.02
    assert any("worse than not registering" in w for w in record["warnings"])
    assert "warning: Dice fell from" in capsys.readouterr().err


# -- 2. runs that collide -----------------------------------------------------------------------------
def test_run_folders_are_unique_and_created_exclusively(tmp_path):
    base = str(tmp_path / "runs" / "2026-12-01_10-00-00")
    made = {unique_dir(base) for _ in range(20)}
    assert len(made) == 20 and all(os.path.isdir(p) for p in made)


def test_two_runs_started_together_get_their_own_folders(tmp_path, data_dir):
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY_DATA, "dataset.shape=[16,16,16]", "trainer.max_epochs=1",
           "trainer.limit_train_batches=1", f"paths.data_dir={data_dir}"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    runs = sorted((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(runs) == 2
    for run in runs:
        assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert (run / "train.log").read_text().count("finished 1/1 epochs") == 1


# -- 3. resume that takes what it is told, or refuses ----------------------------------------------------
class KeepTrainer(Callback):
    def on_fit_end(self, trainer):
        KeepTrainer.last = trainer


def _resume(tmp_path, data_dir, extra, out):
    overrides = TINY_DATA + ["dataset.shape=[16,16,16]", "~logger", "trainer.limit_train_batches=2"]
    return compose(overrides + extra, output_dir=tmp_path / out, data_dir=data_dir)


def test_resume_with_a_new_learning_rate_and_schedule_uses_them(tmp_path, data_dir, caplog):
    train(_resume(tmp_path, data_dir, ["trainer.max_epochs=1", "scheduler=poly"], "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(ckpt)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * (1 - 1 / 1) ** 0.9 + 0)
    parts = build(_resume(tmp_path, data_dir, ["trainer.max_epochs=4", "scheduler=poly", "optimizer.lr=0.5",
                                               f"ckpt_path={ckpt}"], "b"))
    trainer = parts["trainer"]
    trainer.model, trainer.optimizer, trainer.scheduler = parts["model"], parts["optimizer"], parts["scheduler"]
    trainer.callbacks = []
    with caplog.at_level("INFO", logger="regkit"):
        trainer.restore(str(ckpt))
    # the poly schedule continues at epoch 1 of 4, from the new base rate
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (1 - 1 / 4) ** 0.9)
    assert trainer.scheduler.base_lrs == [0.5]
    assert "resume: optimizer.lr = 0.5 in this run (the checkpoint's run had 0.001): takes effect" in caplog.text
    assert "trainer.max_epochs = 4" in caplog.text


@pytest.mark.parametrize("override, key", [("model.diffeomorphic=true", "model.diffeomorphic"),
                                           ("dataset.deform=0.3", "dataset.deform")])
def test_resume_that_would_change_the_model_or_data_is_refused(tmp_path, data_dir, override, key):
    train(_resume(tmp_path, data_dir, ["trainer.max_epochs=1"], "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    cfg = _resume(tmp_path, data_dir, ["trainer.max_epochs=2", override, f"ckpt_path={ckpt}"], "b")
    with pytest.raises(InputError, match=f"resuming cannot change the model or the data, but {key}") as err:
        train(cfg)
    assert "\n" not in str(err.value)


# -- 4. interrupts ------------------------------------------------------------------------------------------
def _start(tmp_path, data_dir, *extra):
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY_DATA, "dataset.shape=[16,16,16]", "trainer.max_epochs=50",
           "dataset.n_train=8", f"paths.data_dir={data_dir}", *extra]
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_training(tmp_path, proc, timeout=300):
    start = time.time()
    while time.time() - start < timeout:
        logs = list((tmp_path / "outputs").rglob("train.log"))
        if logs and "epoch 1/50" in logs[0].read_text():
            return logs[0].parent
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read()[-2000:])
        time.sleep(0.5)
    raise AssertionError("training did not start")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_say_how_to_resume(tmp_path, data_dir, sig, code):
    proc = _start(tmp_path, data_dir)
    run = _wait_for_training(tmp_path, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-2000:]
    ckpt = run / "checkpoints" / "interrupted.ckpt"
    assert ckpt.is_file()
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.startswith("regkit: interrupted")]
    assert len(lines) == 1 and f"by {signal.Signals(sig).name}" in lines[0]
    assert lines[0].endswith(f"ckpt_path={ckpt}") and "resume with: python train.py" in lines[0]
    data = load_checkpoint(ckpt)
    assert data["global_step"] >= 1


def test_requeue_hands_sigusr2_on_after_stopping(tmp_path):
    """With trainer.requeue, SIGUSR2 (SLURM's time-limit warning) stops the loop like SIGTERM; once
    the handlers are restored, the launcher's own handler (submitit's, which requeues) gets it."""
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda *a: seen.append("launcher"))
    try:
        class T:
            requeue, interrupted = True, None

        t = T()
        with StopSignals(t):
            signal.raise_signal(signal.SIGUSR2)
            assert t.interrupted == "SIGUSR2" and seen == []
        signal.raise_signal(signal.SIGUSR2)
        assert seen == ["launcher"]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_ckpt_path_auto_picks_this_runs_newest_checkpoint(tmp_path):
    assert resolve_ckpt_path("auto", tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    last, inter = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "checkpoints" / "interrupted.ckpt"
    last.write_bytes(b"1")
    inter.write_bytes(b"2")
    os.utime(last, (1, 1))
    assert resolve_ckpt_path("auto", tmp_path) == str(inter)
    assert resolve_ckpt_path("x.ckpt", tmp_path) == "x.ckpt"


def test_leftover_temp_files_of_a_killed_write_are_removed_at_start(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    leftover = folder / f".last.ckpt{TEMP_MARK}abc123.ckpt"
    leftover.write_bytes(b"")
    keep = folder / "last.ckpt"
    keep.write_bytes(b"data")
    Checkpoint(str(folder)).on_fit_start(None)
    assert not leftover.exists() and keep.read_bytes() == b"data"


# -- 5. divergence ------------------------------------------------------------------------------------------
def test_a_diverging_run_warns_and_keeps_no_best_worse_than_identity(tmp_path, data_dir, caplog):
    cfg = compose(TINY_DATA + ["dataset.shape=[16,16,16]", "trainer.max_epochs=3", "~logger", "optimizer.lr=0.3",
                               "loss=mse"], output_dir=tmp_path, data_dir=data_dir)
    with caplog.at_level("WARNING", logger="regkit"):
        try:
            metrics = train(cfg)
        except TrainingError as exc:  # a loss that went non-finite also ends it, in one line
            assert "non-finite loss" in str(exc) and "\n" not in str(exc)
            return
    assert "the training loss is diverging" in caplog.text or metrics["val/dice"] >= metrics["val/dice_before"]
    best = tmp_path / "checkpoints" / "best.ckpt"
    if best.exists():
        m = load_checkpoint(best)["metrics"]
        assert m["val/dice"] >= m["val/dice_before"]


def test_divergence_and_worse_than_identity_are_warned_once():
    class T:
        epoch = 1
        metrics = {"train/epoch_loss/total": -0.5, "val/dice": 0.7, "val/dice_before": 0.6}

        class optimizer:
            param_groups = [{"lr": 0.1}]

    cb, t = DivergenceWarning(), T()
    warnings = []
    import logging

    handler = logging.Handler()
    handler.emit = lambda r: warnings.append(r.getMessage())
    logging.getLogger("regkit").addHandler(handler)
    try:
        cb.on_train_epoch_end(t)
        t.metrics = {"train/epoch_loss/total": 2.7e25, "val/dice": 0.0, "val/dice_before": 0.6}
        cb.on_train_epoch_end(t)
        cb.on_train_epoch_end(t)
    finally:
        logging.getLogger("regkit").removeHandler(handler)
    assert sum("diverging" in w for w in warnings) == 1 and sum("below the unregistered Dice" in w for w in warnings) == 1


def test_best_checkpoint_is_never_worse_than_no_registration(tmp_path):
    cb = Checkpoint(str(tmp_path), baseline="val/dice_before")
    assert not cb._improved(0.5, baseline=0.6) and cb._improved(0.61, baseline=0.6) and cb._improved(0.3, None)


# -- 6. errors in one line, exit 2 --------------------------------------------------------------------------
def test_a_folder_where_a_csv_is_expected(tmp_path, data_dir):
    cmd = [sys.executable, str(ROOT / "train.py"), "dataset=pairs", f"dataset.train={tmp_path}", "trainer.device=cpu"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if "regkit: error" in line]
    assert errors == [f"regkit: error: {tmp_path}: is a folder; expected a pair-list CSV file "
                      f"(columns moving,fixed[,moving_label,fixed_label])"]


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory, uint8_scans):
    d = tmp_path_factory.mktemp("run")
    ckpt = _checkpoint(d / "net.ckpt")
    data = load_checkpoint(ckpt)
    pairs = d / "pairs.csv"
    s = uint8_scans
    pairs.write_text(f"moving,fixed,moving_label,fixed_label\n{s['moving']},{s['fixed']},{s['moving_label']},"
                     f"{s['fixed_label']}\n")
    data["config"] = {"dataset": {"_target_": "regkit.data.PairData", "train": str(pairs), "test": str(pairs)}}
    save_checkpoint(ckpt, data)
    return ckpt


@pytest.mark.parametrize("case", ["pairs_folder", "unknown_key", "out_is_file"])
def test_evaluate_errors_are_one_line(tmp_path, run_checkpoint, capsys, case):
    args = [str(run_checkpoint), "--device", "cpu", "--no-hd95", "--out", str(tmp_path / "eval")]
    if case == "pairs_folder":
        args += ["--pairs", str(tmp_path)]
        expected = f"{tmp_path}: is a folder; expected a pair-list CSV file"
    elif case == "unknown_key":
        args += ["--set", "dataset.trian=x.csv"]
        expected = ("--set dataset.trian=...: the checkpoint's config has no such key; did you mean dataset.train? "
                    "(keys under 'dataset': _target_, train, test)")
    else:
        (tmp_path / "eval").write_text("a file")
        expected = f"{tmp_path / 'eval'}: exists and is not a folder"
    with pytest.raises(SystemExit) as exit_:
        evaluate_cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("regkit: error: ") and expected in err[0]


def test_register_errors_are_printed_once(tmp_path, uint8_scans, run_checkpoint):
    (tmp_path / "taken").write_text("a file")
    s = uint8_scans
    cmd = [sys.executable, str(ROOT / "scripts" / "register.py"), str(run_checkpoint), str(s["moving"]), str(s["fixed"]),
           "-o", str(tmp_path / "taken"), "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"regkit: error: {tmp_path / 'taken'}: exists and is not a folder; "
                                               f"choose another output folder"]


def test_unwritable_destinations_are_one_line(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(InputError, match=f"{tmp_path}: cannot write there .Permission denied."):
        atomic_write(tmp_path / "x.txt", lambda t: None)
    monkeypatch.undo()
    monkeypatch.setattr(os, "access", lambda *a: False)
    with pytest.raises(InputError, match="cannot write there .* permission denied"):
        check_output_folder(tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()


# -- 8. files others can read ----------------------------------------------------------------------------------
def test_outputs_are_readable_by_others_under_the_default_umask(tmp_path, uint8_scans):
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "c.ckpt", {"epoch": 1})
        ckpt = _checkpoint(tmp_path / "net.ckpt")
        register_files(ckpt, uint8_scans["moving"], uint8_scans["fixed"], tmp_path / "out", device="cpu")
    finally:
        os.umask(old)
    files = [tmp_path / "c.ckpt", *sorted((tmp_path / "out").iterdir())]
    assert len(files) >= 6
    for f in files:
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode == 0o644, (f, oct(mode))


# -- 9. small things a newcomer hits ------------------------------------------------------------------------------
def test_train_help_is_regkits_own(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("regkit: train a deep image registration network")
    assert "model: lkunet" in res.stdout and "powered by Hydra" not in res.stdout
    assert not (tmp_path / "outputs").exists()  # asking for help creates no run folder


@pytest.mark.parametrize("shape", [(48, 48, 48), (40, 48, 56), (32, 40)])
def test_validation_picture_shows_the_grid_and_a_difference(shape):
    torch.manual_seed(0)
    moving, fixed = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    flow = torch.zeros(1, len(shape), *shape)
    panel = slice_panel(moving, fixed, moving, flow)
    rows = 3 if len(shape) == 3 else 1
    cols = len(PANEL_COLUMNS)
    assert panel.shape[0] % rows == 0 and panel.shape[1] % cols == 0 and panel.shape[0] // rows >= 128
    h, w = panel.shape[0] // rows, panel.shape[1] // cols
    cells = [[panel[r * h:(r + 1) * h, c * w:(c + 1) * w] for c in range(cols)] for r in range(rows)]
    grid = PANEL_COLUMNS.index("deformation grid")
    diff = PANEL_COLUMNS.index("fixed - warped")
    for row in cells:
        assert row[grid].max() > 0.99 and (row[grid] < 0.01).mean() > 0.3  # lines on a background, never blank
        assert row[diff].std() > 0.05  # fixed and warped differ here, and the difference shows it
