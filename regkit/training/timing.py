"""Per-phase wall-clock timing of training steps.

Time is read only at synchronised points: on CUDA every phase boundary calls
``torch.cuda.synchronize`` (when ``sync=True``), so a phase's time is the work it queued, not
the time to launch it. The first ``warmup_steps`` steps after start (or resume) are excluded
from the per-phase sums and the step statistics (detectron2's ``IterationTimer`` does the same);
the epoch wall time always counts everything.
"""
from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator

import torch

from regkit.device import synchronize

PHASES = ("data", "forward", "loss", "backward", "optimizer")


@dataclass
class EpochTiming:
    """One epoch. ``phases`` are seconds summed over the steady (non-warm-up) steps."""

    wall: float
    steps: int
    steady_steps: int
    samples: int
    phases: Dict[str, float] = field(default_factory=dict)
    peak_memory_mib: float = float("nan")
    memory_kind: str = "cpu_max_rss"

    @property
    def step_mean(self) -> float:
        return sum(self.phases.values()) / self.steady_steps if self.steady_steps else float("nan")

    @property
    def samples_per_s(self) -> float:
        total = sum(self.phases.values())
        steady_samples = self.samples * self.steady_steps / max(self.steps, 1)
        return steady_samples / total if total > 0 else float("nan")

    def scalars(self) -> Dict[str, float]:
        """TensorBoard scalar names -> values."""
        out = {"time/epoch": self.wall, "time/step_mean": self.step_mean,
               "throughput/samples_per_s": self.samples_per_s}
        total = sum(self.phases.values())
        for name, secs in self.phases.items():
            out[f"time/{name}"] = secs
        if total > 0:
            out["time/data_share"] = self.phases.get("data", 0.0) / total
            out["time/compute_share"] = 1.0 - out["time/data_share"]
        out[f"memory/{self.memory_kind}_mib"] = self.peak_memory_mib
        return out


def _max_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


class PhaseTimer:
    """Accumulates phase times over an epoch: ``with timer.phase("forward"): ...``."""

    def __init__(self, device: torch.device, sync: bool = True, warmup_steps: int = 2,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        """``clock`` returns seconds (a fake one in tests)."""
        self.clock = clock
        self.device = torch.device(device)
        self.sync = sync and self.device.type == "cuda"
        self.warmup_steps = max(0, int(warmup_steps))
        self._seen = 0  # steps since start/resume, across epochs
        self._reset()

    def _reset(self) -> None:
        self._phases = {p: 0.0 for p in PHASES}
        self._steps = self._steady = self._samples = 0
        self._epoch_start = None

    def _now(self) -> float:
        if self.sync:
            synchronize(self.device)
        return self.clock()

    @property
    def in_warmup(self) -> bool:
        return self._seen < self.warmup_steps

    def start_epoch(self) -> None:
        self._reset()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._epoch_start = self._now()

    @contextmanager
    def phase(self, name: str):
        start = self._now()
        try:
            yield
        finally:
            if not self.in_warmup:
                self._phases[name] = self._phases.get(name, 0.0) + self._now() - start

    def iterate(self, loader: Iterable) -> Iterator:
        """Yield from ``loader``, timing the wait for each batch as the ``data`` phase."""
        it = iter(loader)
        while True:
            start = self._now()
            try:
                batch = next(it)
            except StopIteration:
                return
            if not self.in_warmup:
                self._phases["data"] += self._now() - start
            yield batch

    def end_step(self, batch_size: int) -> None:
        if not self.in_warmup:
            self._steady += 1
        self._seen += 1
        self._steps += 1
        self._samples += int(batch_size)

    def end_epoch(self) -> EpochTiming:
        wall = self._now() - self._epoch_start
        if self.device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(self.device) / 2 ** 20, "cuda_peak_allocated"
        else:
            peak, kind = _max_rss_mib(), "cpu_max_rss"
        return EpochTiming(wall=wall, steps=self._steps, steady_steps=self._steady, samples=self._samples,
                           phases=dict(self._phases), peak_memory_mib=peak, memory_kind=kind)
