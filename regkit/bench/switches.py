"""The trainer's speed switches side by side, timed on regkit's own training step:
``trainer.precision`` (fp32 / bf16 / fp16 autocast), ``trainer.channels_last`` and
``trainer.compile``.

Each configuration is composed and built exactly as ``python train.py model=<model>
trainer.precision=... trainer.channels_last=... trainer.compile=...`` builds it
(:func:`regkit.bench.config.compose`, :func:`regkit.experiment.build`): the same model, the
configured loss (``lncc_fast`` + ``grad`` by default: float32, outside autocast) and optimizer,
and the :class:`~regkit.training.Trainer` with its switches. It then trains with
:meth:`Trainer.fit` on one fixed batch, the first training batch of the configured dataset
(``dataset=synthetic`` at the benchmark's size), one ``fit`` epoch of one step at a time, so the
configurations take turns step by step and machine noise slows them alike. A step's time is what
the trainer's own timer (:mod:`regkit.training.timing`) records for it: the sum of its phases
(data, forward, loss, backward, optimizer step), CUDA synchronised at every phase boundary
(``trainer.sync_timing``).

Before the timed steps each configuration runs ``warmup`` untimed steps; the first of them,
which includes any compilation, is reported apart. float16 convolutions on the CPU are
reference kernels (about a minute per step at 64³), so on the CPU ``fp16`` runs one warm-up
step and one timed step, outside the turns.

Accuracy at the shared initial weights on the same batch: every configuration starts from the
same weights (same seed; checked), and the first step's predicted field and loss, as the
trainer computed them, are compared with fp32's (relative L2 difference of the field, absolute
difference of the loss). The network's flow head is drawn with standard deviation 1e-2 instead
of its 1e-5 initialisation, like a trained network's, so that the fields are not all about zero
(a model without a ``flow_head`` keeps its initialisation).

CUDA peak memory: the most memory allocated during a timed step above what was allocated just
before it (activations, gradients, workspaces), from the trainer's timer; the weights and
optimizer states of all switches stay allocated throughout and are not counted.
"""
from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from regkit.bench.config import CONFIG_DIR, compose
from regkit.bench.machine import Machine, describe_machine
from regkit.bench.report import markdown_table
from regkit.bench.timing import Timings
from regkit.errors import InputError, check_choice
from regkit.experiment import build
from regkit.training import Trainer
from regkit.training.timing import EpochTiming

# name: the trainer switches (Hydra overrides) of that configuration; fp32 first, the reference
SWITCHES: Dict[str, Dict[str, Any]] = {
    "fp32": {},
    "bf16": {"trainer.precision": "bf16"},
    "fp16": {"trainer.precision": "fp16"},
    "channels_last": {"trainer.channels_last": True},
    "bf16 + channels_last": {"trainer.precision": "bf16", "trainer.channels_last": True},
    "compile": {"trainer.compile": True},
    "compile + channels_last": {"trainer.compile": True, "trainer.channels_last": True},
}
SLOW_ON_CPU = frozenset({"fp16"})
SECTION = "bench_switches"
FLOW_HEAD_STD = 1e-2
MiB = 2 ** 20


class RepeatedBatch:
    """A data module for :meth:`Trainer.fit` whose training loader yields one batch ``steps``
    times (the same tensors: no data loading in the timed steps)."""

    def __init__(self, batch: Mapping[str, Any], steps: int = 1) -> None:
        self.batch, self.steps = dict(batch), int(steps)

    def setup(self) -> "RepeatedBatch":
        return self

    def train_dataloader(self) -> List[Dict[str, Any]]:
        return [self.batch] * self.steps


@dataclass
class SwitchResult:
    """One configuration on one device. Times in seconds, from the trainer's timer: ``steps.first``
    is the first warm-up step (with any compilation), ``steps.times`` the timed steps."""

    device: str
    name: str
    steps: Timings = field(default_factory=Timings)
    phases: Dict[str, List[float]] = field(default_factory=dict)  # per timed step
    loss: float = math.nan                  # the first step's loss, at the shared initial weights
    field_rel_diff: float = math.nan        # ... its field against fp32's
    loss_diff: float = math.nan             # ... its loss against fp32's
    cuda_peak_mib: Optional[float] = None   # CUDA: largest step peak above the memory allocated before it
    one_step: bool = False                  # timed on one step, outside the turns
    trained_steps: int = 0                  # the trainer's global_step at the end


class _Run:
    """One configuration: its built trainer, model, loss and optimizer."""

    def __init__(self, name: str, parts: Mapping[str, Any]) -> None:
        self.name = name
        self.trainer: Trainer = parts["trainer"]
        self.model: nn.Module = parts["model"]
        self.loss: nn.Module = parts["loss"]
        self.optimizer = parts["optimizer"]
        self.field: Optional[torch.Tensor] = None
        self.loss_value = math.nan

    def fit(self, batch: Mapping[str, Any], steps: int) -> Tuple[EpochTiming, float]:
        """``steps`` training steps: one more epoch of ``Trainer.fit`` over the repeated batch.
        Returns the trainer's timing of that epoch and, on CUDA, the MiB allocated before it."""
        device = self.trainer.device
        before = torch.cuda.memory_allocated(device) / MiB if device.type == "cuda" else 0.0
        self.trainer.max_epochs = self.trainer.epoch + 1
        self.trainer.fit(self.model, self.loss, self.optimizer, RepeatedBatch(batch, steps))
        return self.trainer.last_timing, before

    def record_first_output(self) -> None:
        """Keep the field and the loss of the next loss evaluation (a hook on the trainer's loss
        module: what the trainer passes to it and what it returns, nothing recomputed)."""
        def hook(module, args, output):
            self.field = args[0].flow.detach().float().cpu()
            self.loss_value = float(output.total.detach())
            handle.remove()

        handle = self.loss.register_forward_hook(hook)


def switch_overrides(name: str) -> List[str]:
    return [f"{key}={str(value).lower() if isinstance(value, bool) else value}"
            for key, value in SWITCHES[check_choice("switch", name, SWITCHES)].items()]


def base_overrides(device: str, model: str, size: Sequence[int], batch: int, work_dir: Path,
                   data_dir: Path) -> List[str]:
    """What every configuration shares: the model, the dataset reduced to one batch of ``size``,
    one step per epoch, no callbacks or logger (no validation, checkpoints or files)."""
    shape = ",".join(str(int(s)) for s in size)
    return [f"model={model}", f"trainer.device={device}", "trainer.max_epochs=1", "trainer.warmup_steps=0",
            f"dataset.shape=[{shape}]", f"dataset.n_train={batch}", "dataset.n_val=0", "dataset.n_test=0",
            f"dataset.batch_size={batch}", "dataset.num_workers=0", "~callbacks", "~logger",
            f"paths.output_dir={work_dir}", f"paths.data_dir={data_dir}"]


def _trained_like_flow_head(model: nn.Module) -> None:
    head = getattr(model, "flow_head", None)
    if head is not None:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * FLOW_HEAD_STD)


def _check_same_weights(runs: Sequence[_Run]) -> None:
    ref = runs[0].model.state_dict()
    for run in runs[1:]:
        for key, value in run.model.state_dict().items():
            if not torch.equal(value, ref[key]):
                raise RuntimeError(f"configuration '{run.name}' starts from other weights than "
                                   f"'{runs[0].name}' ({key}); the comparison would not be fair")


def check_names(names: Sequence[str]) -> List[str]:
    names = [check_choice("switch", n, SWITCHES) for n in names]
    if not names or names[0] != "fp32":
        raise InputError(f"the switches must start with fp32, the reference; got {', '.join(names) or 'none'}")
    if len(set(names)) != len(names):
        raise InputError(f"a switch is named twice: {', '.join(names)}")
    return names


@dataclass
class DeviceRun:
    """The switches timed on one device, with the conditions."""

    machine: Machine
    loss: str                  # the loss's terms, e.g. ``lncc_fast + grad``
    results: List[SwitchResult]


def run_switches(device: Union[str, torch.device], names: Sequence[str] = tuple(SWITCHES), model: str = "vxm1",
                 size: Sequence[int] = (64, 64, 64), batch: int = 1, steps: int = 10, warmup: int = 2,
                 overrides: Sequence[str] = (), data_dir: Union[str, Path, None] = None,
                 config_dir: Union[str, Path] = CONFIG_DIR, log: Callable[[str], None] = print) -> DeviceRun:
    """Time every configuration in ``names`` (fp32 first) on ``device``; see the module docstring.

    Args:
        size: the volume size (D, H, W) of the synthetic pair.
        steps: timed steps per configuration (taken in turns); warmup: untimed steps first.
        overrides: further Hydra overrides for every configuration (e.g. ``loss=lncc``).
        data_dir: where the synthetic data is generated (``paths.data_dir``; a temporary folder
            by default).
    """
    names = check_names(names)
    if steps < 1 or warmup < 1 or batch < 1:
        raise InputError(f"need steps >= 1, warmup >= 1 and batch >= 1, got {steps}, {warmup} and {batch}")
    device = torch.device(device)
    described = describe_machine(device)
    with tempfile.TemporaryDirectory(prefix="regkit_bench_switches_") as tmp:
        work = Path(tmp)
        common = base_overrides(str(device), model, size, batch, work / "run", Path(data_dir or work / "data"))
        runs, data, loss = [], None, ""
        for name in names:
            cfg = compose(common + switch_overrides(name) + list(overrides), config_dir)
            parts = build(cfg)
            runs.append(_Run(name, parts))
            if data is None:
                data, loss = parts["data"], loss_description(cfg)
        for run in runs:
            _trained_like_flow_head(run.model)
        _check_same_weights(runs)
        batch_dict = next(iter(data.setup().train_dataloader()))  # synthetic data is generated here, once
        return DeviceRun(described, loss, _time_runs(runs, batch_dict, device, steps, warmup, log))


def loss_description(cfg) -> str:
    """``lncc_fast + grad``: the names of the configured loss's terms."""
    terms = (cfg.get("loss") or {}).get("terms") or {}
    return " + ".join(terms) if terms else str((cfg.get("loss") or {}).get("_target_", "?"))


def _time_runs(runs: List[_Run], batch: Mapping[str, Any], device: torch.device, steps: int, warmup: int,
               log: Callable[[str], None]) -> List[SwitchResult]:
    results = {}
    slow = {run.name for run in runs if device.type == "cpu" and run.name in SLOW_ON_CPU}
    for run in runs:  # warm-up; the first step records the field and loss at the initial weights
        run.record_first_output()
        first, _ = run.fit(batch, 1)
        res = results[run.name] = SwitchResult(device.type, run.name, Timings(first=first.step_mean),
                                               one_step=run.name in slow)
        if run.name in slow:
            _add_step(res, *run.fit(batch, 1), device)
        elif warmup > 1:
            run.fit(batch, warmup - 1)
        log(f"  {device} {run.name}: first step {first.step_mean:.2f} s")
    for k in range(steps):  # the configurations take turns, one step each
        for run in runs:
            if run.name not in slow:
                _add_step(results[run.name], *run.fit(batch, 1), device)
        log(f"  {device}: timed round {k + 1}/{steps}")
    ref = runs[0]
    for run in runs:
        res = results[run.name]
        res.loss, res.loss_diff = run.loss_value, abs(run.loss_value - ref.loss_value)
        res.field_rel_diff = float((run.field - ref.field).norm() / ref.field.norm())
        res.trained_steps = run.trainer.global_step
    return [results[run.name] for run in runs]


def _add_step(res: SwitchResult, timing: EpochTiming, allocated_before: float, device: torch.device) -> None:
    if timing.steady_steps != 1:
        raise RuntimeError(f"expected one timed step per epoch, the trainer timed {timing.steady_steps}")
    res.steps.times.append(timing.step_mean)
    for phase, seconds in timing.phases.items():
        res.phases.setdefault(phase, []).append(seconds)
    if device.type == "cuda":  # the step's own peak: every switch's weights stay allocated throughout
        res.cuda_peak_mib = max(res.cuda_peak_mib or 0.0, timing.peak_memory_mib - allocated_before)


def markdown(runs: Sequence[DeviceRun], *, model: str, size: Sequence[int], batch: int, steps: int, warmup: int,
             command: str, load_after: float) -> str:
    """The generated section of docs/scaling.md: what was run, where, and one row per device and
    switch."""
    results = [r for run in runs for r in run.results]
    phases = list(dict.fromkeys(p for r in results for p in r.phases))
    rows = []
    for run in runs:
        base = run.results[0].steps.fastest
        for r in run.results:
            breakdown = " / ".join(f"{1e3 * statistics.median(r.phases[p]):.0f}" for p in phases)
            peak = f"{r.cuda_peak_mib:.0f}" if r.cuda_peak_mib is not None else "-"
            t = r.steps
            rows.append([r.device, f"{r.name} (1 step)" if r.one_step else r.name, f"{1e3 * t.fastest:.0f}",
                         f"{1e3 * t.median:.0f}", f"{base / t.fastest:.2f}x", f"{t.first:.1f}", breakdown,
                         f"{r.field_rel_diff:.1e}", f"{r.loss_diff:.1e}", peak])
    losses = ", ".join(f"{run.machine.device} {run.results[0].loss:.4f}" for run in runs)
    loss_names = ", ".join(dict.fromkeys(run.loss for run in runs))
    lines = [
        "### Measured speed (`scripts/bench_switches.py`)",
        "",
        f"`Trainer.fit` of `{model}` at {'×'.join(str(s) for s in size)}, batch {batch}, loss `{loss_names}` "
        "(float32, outside autocast, as the trainer computes it). Each switch is a trainer composed and built as "
        "`train.py` builds it, trained on one fixed synthetic batch one step at a time, the switches taking turns "
        "step by step. A step's time is what the trainer's phase timer records for it "
        f"({' + '.join(phases)}; CUDA synchronised at every phase boundary). Fastest and median of {steps} timed "
        f"steps after {warmup} untimed step{'s' if warmup != 1 else ''}; the first step (with any compilation) "
        "is reported apart; the speed ratio is of the fastest steps, which other work on the machine disturbs "
        f"least. On the CPU, {', '.join(sorted(SLOW_ON_CPU))} is timed on one step after one warm-up step "
        "(float16 CPU convolutions are reference kernels). Accuracy: the first step's field and loss, from the "
        f"same initial weights on the same batch, against fp32's (relative L2 difference, absolute difference); "
        f"fp32 loss: {losses}. CUDA step peak: memory allocated during a step above the level before it.",
        "",
        f"Command: `{command}`  ",
        "Device: " + "; ".join(run.machine.line() for run in runs) + f" at the start, {load_after:.1f} at the end",
        "",
        markdown_table(["device", "switch", "fastest step ms", "median ms", "speed vs fp32", "first step s",
                        "median " + " / ".join(phases) + " ms", "field rel. diff", "loss diff",
                        "CUDA step peak MiB"],
                       rows).rstrip("\n"),
    ]
    if not any(run.machine.device == "cuda" for run in runs):
        lines += ["", "GPU rows: **not measured** (no CUDA device in this run); the same command adds them on a "
                      "machine with CUDA."]
    return "\n".join(lines) + "\n"
