"""What a benchmark ran on: one reader of the CPU model, core count, load average, torch version,
device name and date, so that every table states its conditions the same way."""
from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: Union[str, Path] = CPUINFO) -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), e.g. ``AMD EPYC 7B13``; elsewhere, or
    when the file has no ``model name`` line, ``platform.processor()`` or the architecture."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none): how busy the machine was."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def device_name(device: Union[str, torch.device], threads: Optional[int] = None) -> str:
    """``NVIDIA H100 80GB HBM3`` for a CUDA device; for the CPU its model, core count and the
    torch threads in use (``threads`` when the measurement sets its own)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {os.cpu_count()} cores, {threads or torch.get_num_threads()} torch threads"


@dataclass(frozen=True)
class Machine:
    """The conditions of one benchmark run."""

    device: str         # "cpu", "cuda", ...
    device_name: str    # see :func:`device_name`
    cpu_model: str
    cores: int
    torch_threads: int
    load_average: float  # 1-minute load average when described
    torch_version: str
    date: str           # ISO date

    def line(self) -> str:
        """One line for a table's caption."""
        return (f"{self.device}: {self.device_name} | torch {self.torch_version} | {self.date} | "
                f"load average {self.load_average:.1f}")


def describe_machine(device: Union[str, torch.device] = "cpu", threads: Optional[int] = None) -> Machine:
    """Describe this machine and ``device`` now."""
    device = torch.device(device)
    return Machine(device=device.type, device_name=device_name(device, threads), cpu_model=cpu_model(),
                   cores=os.cpu_count() or 0, torch_threads=threads or torch.get_num_threads(),
                   load_average=load_average(), torch_version=torch.__version__,
                   date=datetime.date.today().isoformat())
