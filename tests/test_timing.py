"""Per-epoch timing: the timer's bookkeeping, a sweep's logs turned into the preprint-style
table without re-running, and identical training whichever LNCC computes the loss."""
import csv
import subprocess
import sys

import pytest
import torch

from regkit.training.timing import PhaseTimer
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import summarize_timing  # noqa: E402


class FakeClock:
    """A clock that only moves when told to (no sleeping, no dependence on the machine's load)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def test_phase_timer_excludes_warmup_and_sums_phases():
    clock = FakeClock()
    timer = PhaseTimer(torch.device("cpu"), warmup_steps=1, clock=clock)
    timer.start_epoch()

    def loader():
        for step in range(3):
            clock.advance(0.004)  # waiting for the batch: the data phase
            yield step

    for step in timer.iterate(loader()):
        with timer.phase("forward"):
            clock.advance(0.2 if step == 0 else 0.01)  # the warm-up step is slow
        with timer.phase("backward"):
            clock.advance(0.03)
        clock.advance(0.5)  # outside every phase: counts in the wall time only
        timer.end_step(batch_size=2)
    t = timer.end_epoch()
    assert (t.steps, t.steady_steps, t.samples) == (3, 2, 6)
    assert t.phases["forward"] == pytest.approx(0.02)  # two steady steps of 10 ms, not the 200 ms warm-up
    assert t.phases["backward"] == pytest.approx(0.06) and t.phases["data"] == pytest.approx(0.008)
    assert t.wall == pytest.approx(0.004 * 3 + 0.2 + 0.01 * 2 + 0.03 * 3 + 0.5 * 3)
    assert t.step_mean == pytest.approx((0.02 + 0.06 + 0.008) / 2)
    s = t.scalars()
    assert s["time/data_share"] == pytest.approx(0.008 / 0.088)
    assert s["time/data_share"] + s["time/compute_share"] == pytest.approx(1.0)
    assert s["time/forward"] == pytest.approx(0.02) and s["memory/cpu_max_rss_mib"] > 0


def test_sweep_logs_become_the_table(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=epoch_time", "model=vxm1",
           "loss=lncc,lncc_group,lncc_fast", "dataset.shape=[16,16,16]", "dataset.n_train=3", "dataset.num_workers=0",
           "dataset.cache=true", "trainer.max_epochs=2", "trainer.device=cpu", "callbacks.progress.enabled=false",
           f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2"] and all((sweep / j / "tensorboard").is_dir() for j in jobs)

    out = tmp_path / "table.md"
    assert summarize_timing.main([str(sweep), "--out", str(out), "--csv", str(tmp_path / "t.csv"),
                                  "--png", str(tmp_path / "t.png")]) == 0
    text = out.read_text()
    assert "| VM-1 |" in text and "3 runs" in text and "16×16×16" in text
    rows = {r["loss"]: r for r in csv.DictReader(open(tmp_path / "t.csv"))}
    assert set(rows) == {"lncc", "lncc_group", "lncc_fast"}
    # the table's reductions are computed from the logged epoch times (epoch 2, warm-up epoch left out)
    a, b, f = (float(rows[k]["epoch_s"]) for k in ("lncc", "lncc_group", "lncc_fast"))
    row = next(line for line in text.splitlines() if line.startswith("| VM-1 |") and "%" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == [f"{a:.2f}", f"{b:.2f}", f"{f:.2f}"]
    assert cells[4] == f"{(a - b) / a * 100:.1f}%" and cells[5] == f"{(a - f) / a * 100:.1f}%"
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_summarize_reports_empty_folder(tmp_path, capsys):
    assert summarize_timing.main([str(tmp_path)]) == 2
    assert "no run with timing scalars" in capsys.readouterr().err


def _train_weights(loss_name, dtype, batches, steps=4):
    """Weights of vxm1 after ``steps`` Adam steps (lr 1e-3) on fixed batches, in ``dtype``."""
    import regkit

    torch.manual_seed(0)
    model = regkit.create_model("vxm1").to(dtype)
    sim, reg = regkit.create_loss(loss_name), regkit.create_loss("grad")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for b in batches[:steps]:
        moving, fixed = b["moving"][None].to(dtype), b["fixed"][None].to(dtype)
        out = model(moving, fixed)
        loss = sim(out.warped, fixed) + reg(out.flow)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten().double() for p in model.parameters()])


def test_same_weights_with_every_lncc(data_dir):
    """The speed-up changes nothing else: after a fixed number of steps the weights trained with
    lncc, lncc_group and lncc_fast agree to round-off in float64; in float32 they differ from each
    other by less than float32 rounding moves any one of them off the float64 trajectory
    (Adam turns rounding noise in near-zero gradients into step-sized updates)."""
    from regkit.data import SyntheticData

    data = SyntheticData(data_dir / "weights", shape=(16, 16, 16), n_train=4, n_val=0, n_test=0).setup()
    batches = [data.datasets["train"][k] for k in range(4)]
    w64 = {n: _train_weights(n, torch.float64, batches) for n in ("lncc", "lncc_group", "lncc_fast")}
    w32 = {n: _train_weights(n, torch.float32, batches) for n in ("lncc", "lncc_group", "lncc_fast")}
    for n in ("lncc_group", "lncc_fast"):
        assert (w64[n] - w64["lncc"]).abs().max() < 1e-10, n
    float32_noise = (w32["lncc"] - w64["lncc"]).abs().max()
    assert float32_noise > 0
    for n in ("lncc_group", "lncc_fast"):
        assert (w32[n] - w32["lncc"]).abs().max() < 0.5 * float32_noise, n
