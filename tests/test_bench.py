"""regkit.bench: the pieces the benchmark scripts share (doc sections, machine description,
process memory, timing with a fake clock) and the speed-switch benchmark run through the real
Trainer at a reduced size."""
from __future__ import annotations

import datetime
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from regkit.bench import machine as machine_mod
from regkit.bench.machine import cpu_model, describe_machine, device_name
from regkit.bench.memory import mem_available_gib, out_of_memory, status_kib
from regkit.bench.report import command_line, markdown_table, read_section, replace_section
from regkit.bench.timing import interleave, time_calls, timed_call
from regkit.errors import InputError
from tests.conftest import ROOT


# -- doc sections -------------------------------------------------------------------------------
DOC = """# Title

intro

<!-- a:start -->
old a
<!-- a:end -->

middle

<!-- b:start -->
old b
<!-- b:end -->
tail
"""


def test_replace_section_rewrites_only_its_own_section(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(DOC)
    replace_section(doc, "a", "new a\n| x |\n")
    assert doc.read_text() == DOC.replace("old a", "new a\n| x |")
    assert read_section(doc, "a") == "new a\n| x |\n" and read_section(doc, "b") == "old b\n"
    replace_section(doc, "a", "new a\n| x |")  # the same body again changes nothing
    assert doc.read_text() == DOC.replace("old a", "new a\n| x |")


def test_replace_section_appends_when_absent(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\ntext\n\n\n")
    replace_section(doc, "c", "body")
    assert doc.read_text() == "# Title\n\ntext\n\n<!-- c:start -->\nbody\n<!-- c:end -->\n"
    new = tmp_path / "sub" / "new.md"  # a missing file (and folder) is created
    replace_section(new, "c", "body\n")
    assert new.read_text() == "<!-- c:start -->\nbody\n<!-- c:end -->\n"
    assert read_section(tmp_path / "none.md", "c") is None and read_section(doc, "zz") is None


def test_replace_section_refuses_a_lone_marker(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- a:start -->\nno end\n")
    with pytest.raises(ValueError, match="only one of its markers"):
        replace_section(doc, "a", "x")
    assert doc.read_text() == "<!-- a:start -->\nno end\n"


def test_replace_section_is_atomic(tmp_path, monkeypatch):
    """A write that fails at the rename leaves the file as it was and no temporary file behind."""
    doc = tmp_path / "doc.md"
    doc.write_text(DOC)

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        replace_section(doc, "a", "new a")
    assert doc.read_text() == DOC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.md"]


def test_markdown_table_and_command_line():
    assert markdown_table(["a", "b"], [[1, "x"], ["2", 3.5]], align="lr") == "| a | b |\n|---|---:|\n| 1 | x |\n| 2 | 3.5 |\n"
    argv = ["--size", "32", "--out", "docs/x.md", "--steps=2", "--out=y.md", "loss=lncc"]
    assert command_line("python s.py", argv) == "python s.py --size 32 --steps=2 loss=lncc"
    assert command_line("s.py", ["--data-dir", "/tmp/d", "--out", "o"], drop=("--out", "--data-dir")) == "s.py"


# -- machine ------------------------------------------------------------------------------------
def test_cpu_model_reads_cpuinfo_and_falls_back(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Test CPU 9000 @ 3.0GHz\nflags\t: a b\n")
    assert cpu_model(info) == "Test CPU 9000 @ 3.0GHz"
    info.write_text("processor\t: 0\n")  # no model name line (e.g. some ARM kernels)
    monkeypatch.setattr(machine_mod.platform, "processor", lambda: "")
    monkeypatch.setattr(machine_mod.platform, "machine", lambda: "armv9")
    assert cpu_model(info) == "armv9" and cpu_model(tmp_path / "missing") == "armv9"


def test_machine_description_fields():
    m = describe_machine("cpu", threads=3)
    assert m.device == "cpu" and m.cores == os.cpu_count() and m.torch_threads == 3
    assert m.torch_version == torch.__version__ and m.cpu_model == cpu_model()
    assert datetime.date.fromisoformat(m.date) == datetime.date.today()
    assert m.load_average == pytest.approx(os.getloadavg()[0], abs=5)  # a reading, not a constant
    assert m.device_name == f"{cpu_model()}, {os.cpu_count()} cores, 3 torch threads" == device_name("cpu", 3)
    line = m.line()
    assert line.startswith(f"cpu: {m.device_name} | torch {torch.__version__} | {m.date} | load average ")


# -- memory -------------------------------------------------------------------------------------
def test_proc_readers(tmp_path, monkeypatch):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n")
    assert status_kib("VmHWM", status) == 204800 and status_kib("VmRSS", status) == 102400
    with pytest.raises(KeyError, match="VmSwap"):
        status_kib("VmSwap", status)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       8388608 kB\nMemFree:  1048576 kB\nMemAvailable:   3145728 kB\n")
    assert mem_available_gib(meminfo) == 3.0
    # the one fallback: free physical pages, where MemAvailable is missing
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 262144, "SC_PAGE_SIZE": 4096}[name])
    meminfo.write_text("MemTotal:       8388608 kB\n")
    assert mem_available_gib(meminfo) == 1.0 == mem_available_gib(tmp_path / "missing")

    def no_sysconf(name):
        raise ValueError(name)

    monkeypatch.setattr(os, "sysconf", no_sysconf)
    with pytest.raises(OSError, match="available memory unknown"):
        mem_available_gib(meminfo)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_memory_sees_an_allocation_inside_the_block():
    # in a fresh process: in this one, earlier tests may have left freed memory resident, which the
    # allocator reuses without the resident size growing (seen: a peak of 0 after the benchmark tests)
    code = ("import torch\nfrom regkit.bench.memory import PeakMemory\n"
            "keep = torch.ones(2 ** 22)  # 16 MiB allocated before the block: not counted\n"
            "with PeakMemory('cpu') as m:\n    x = torch.ones(2 ** 24)  # 64 MiB, touched\n    del x\n"
            "print(m.kind, m.peak_bytes)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "VmHWM"
    assert 60 * 2 ** 20 <= int(out[1]) < 200 * 2 ** 20


def test_out_of_memory_recognises_allocator_failures():
    assert out_of_memory(MemoryError()) == "MemoryError"
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes.\nmore")
    assert out_of_memory(cpu) == "DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes."
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")).startswith("CUDA")
    assert out_of_memory(RuntimeError("shapes cannot be multiplied")) is None


# -- timing -------------------------------------------------------------------------------------
class FakeClock:
    """Time moves only when a timed function says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def work(self, durations):
        it = iter(durations)

        def fn():
            seconds = next(it)
            self.now += seconds
            return seconds
        return fn


def test_time_calls_with_a_fake_clock():
    clock = FakeClock()
    t = time_calls(clock.work([5.0, 0.5, 3.0, 1.0, 2.0]), repeats=3, warmup=2, clock=clock)
    assert t.first == 5.0 and t.times == [3.0, 1.0, 2.0]  # the second warm-up call is not timed
    assert (t.fastest, t.median, t.result) == (1.0, 2.0, 2.0)
    t = time_calls(clock.work([4.0, 1.0, 2.0]), repeats=3, warmup=0, clock=clock)
    assert t.first is None and t.times == [4.0, 1.0, 2.0] and t.median == 2.0
    assert timed_call(clock.work([0.25]), device="cpu", clock=clock) == (0.25, 0.25)
    with pytest.raises(ValueError):
        time_calls(clock.work([]), repeats=0)


def test_interleave_takes_turns_until_each_count():
    clock = FakeClock()
    order = []

    def method(name, durations):
        fn = clock.work(durations)
        return lambda: (order.append(name), fn())[1]

    rounds = []
    out = interleave({"a": method("a", [1.0, 2.0, 3.0]), "b": method("b", [10.0])}, {"a": 3, "b": 1},
                     clock=clock, on_round=lambda k, n: rounds.append((k, n)))
    assert order == ["a", "b", "a", "a"] and rounds == [(1, 3), (2, 3), (3, 3)]
    assert out["a"].times == [1.0, 2.0, 3.0] and out["b"].times == [10.0] and out["b"].result == 10.0


# -- the synthetic pair -------------------------------------------------------------------------
def test_synthetic_pair_is_the_generated_datasets_first_pair(tmp_path):
    from regkit.data import generate_synthetic, load_volume
    from regkit.data.synthetic import synthetic_pair

    atlas, subject = synthetic_pair((16, 18, 20), seed=3)
    root = generate_synthetic(tmp_path / "s", shape=(16, 18, 20), n_train=1, n_val=0, n_test=0, seed=3,
                              progress=False)
    for mine, name in ((atlas, "atlas"), (subject, "train_000")):
        saved = load_volume(root / "images" / f"{name}.nii.gz", np.float32).data
        assert np.array_equal(mine.numpy().astype(np.float32), saved), name


# -- the speed switches, through the Trainer ----------------------------------------------------
@pytest.fixture
def count_training_steps(monkeypatch):
    """Every Trainer.training_step call, per trainer (the benchmark must go through it)."""
    from regkit.training import Trainer

    calls = {}
    original = Trainer.training_step

    def counted(self, batch):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return original(self, batch)

    monkeypatch.setattr(Trainer, "training_step", counted)
    return calls


def test_switches_time_the_trainers_own_step(data_dir, count_training_steps):
    """fp32, channels_last and fp16 (bf16 is left out: torch's CPU bfloat16 convolution gradient is
    sometimes NaN on the 2³ feature maps of a 16³ input, see docs/scaling.md). On the CPU fp16 takes
    its slow path: one warm-up step and one timed step, outside the turns."""
    from regkit.bench.config import compose
    from regkit.bench.switches import _trained_like_flow_head, base_overrides, run_switches
    from regkit.experiment import build
    from regkit.training.timing import PHASES

    run = run_switches("cpu", ["fp32", "channels_last", "fp16"], size=(16, 16, 16), steps=2, warmup=2,
                       data_dir=data_dir / "bench", log=lambda msg: None)
    assert [r.name for r in run.results] == ["fp32", "channels_last", "fp16"] and run.loss == "lncc_fast + grad"
    assert sorted(count_training_steps.values()) == [2, 4, 4]  # warm-up + timed steps per trainer
    for r, steps, trained in zip(run.results, (2, 2, 1), (4, 4, 2)):
        assert r.trained_steps == trained and len(r.steps.times) == steps and set(r.phases) == set(PHASES)
        assert r.steps.first > 0 and all(t > 0 for t in r.steps.times) and r.cuda_peak_mib is None
        assert r.one_step == (r.name == "fp16")
        # the step time is the sum of the trainer's phase times
        assert r.steps.times == pytest.approx([sum(p[k] for p in r.phases.values()) for k in range(steps)])
    fp32, last, fp16 = run.results
    assert fp32.field_rel_diff == 0 and fp32.loss_diff == 0
    assert last.field_rel_diff < 1e-5 and last.loss_diff < 1e-5  # the same arithmetic, another layout
    assert 0 < fp16.field_rel_diff < 3e-3 and fp16.loss_diff < 1e-4  # autocast was on, the loss float32

    # the recorded loss is the trainer's loss of the initial model on the batch
    common = base_overrides("cpu", "vxm1", (16, 16, 16), 1, data_dir / "bench_run", data_dir / "bench")
    parts = build(compose(common))
    _trained_like_flow_head(parts["model"])
    batch = next(iter(parts["data"].setup().train_dataloader()))
    with torch.no_grad():
        expected = parts["loss"](parts["model"](batch["moving"], batch["fixed"]), batch).total
    assert fp32.loss == pytest.approx(float(expected), rel=1e-6)


def test_switch_names_are_checked():
    from regkit.bench.switches import check_names

    with pytest.raises(InputError, match="Unknown switch 'fp64'"):
        check_names(["fp32", "fp64"])
    with pytest.raises(InputError, match="must start with fp32"):
        check_names(["bf16", "fp32"])
    assert check_names(["fp32", "compile + channels_last"]) == ["fp32", "compile + channels_last"]


def test_bench_switches_script_rewrites_its_section(tmp_path, data_dir, count_training_steps, capsys):
    """scripts/bench_switches.py end to end at 16³ into a copy of docs/scaling.md: only the
    bench_switches section changes, and it holds a row per switch."""
    doc = tmp_path / "scaling.md"
    shutil.copy(ROOT / "docs" / "scaling.md", doc)
    before = doc.read_text()
    spec = importlib.util.spec_from_file_location("bench_switches", ROOT / "scripts" / "bench_switches.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--size", "16", "--steps", "1", "--warmup", "1", "--devices", "cpu",
                        "--configs", "fp32,channels_last", "--data-dir", str(data_dir / "bench"),
                        "--out", str(doc)]) == 0
    assert sorted(count_training_steps.values()) == [2, 2]
    section = read_section(doc, "bench_switches")
    assert section is not None and "To be regenerated" not in section
    rows = [line for line in section.splitlines() if line.startswith("| cpu |")]
    assert [r.split("|")[2].strip() for r in rows] == ["fp32", "channels_last"]
    assert "Command: `python scripts/bench_switches.py --size 16 --steps 1 --warmup 1 --devices cpu " \
           "--configs fp32,channels_last`" in section
    start, end = before.index("<!-- bench_switches:start -->"), before.index("<!-- bench_switches:end -->")
    after = doc.read_text()
    assert after.startswith(before[:start]) and after.endswith(before[end:])


@pytest.mark.slow  # torch.compile of vxm1: about a minute on 2 cores
def test_switches_compile_through_the_trainer(data_dir, count_training_steps):
    from regkit.bench.switches import run_switches

    run = run_switches("cpu", ["fp32", "compile"], size=(16, 16, 16), steps=1, warmup=1,
                       data_dir=data_dir / "bench", log=lambda msg: None)
    assert sorted(count_training_steps.values()) == [2, 2]
    assert run.results[1].field_rel_diff < 1e-5 and run.results[1].loss_diff < 1e-5
