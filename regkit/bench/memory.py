"""Process memory for benchmarks (Linux ``/proc``; CUDA through torch's allocator statistics).

* :func:`status_kib` reads a field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``VmSize``).
* :func:`reset_peak_rss` resets ``VmHWM`` (the peak resident size) to the current size, so a
  peak can be measured for one piece of code (Linux >= 4.0).
* :func:`mem_available_gib` is what the machine can still give (``MemAvailable``).
* :class:`PeakMemory` measures the peak above the level at its start.
"""
from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from typing import Optional, Union

import torch

from regkit.device import synchronize

GiB = 2 ** 30


def status_kib(field: str, status: Union[str, Path] = "/proc/self/status") -> int:
    """A ``/proc/self/status`` field in KiB, e.g. ``VmRSS``, ``VmHWM`` (peak RSS), ``VmSize``."""
    with open(status) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field} not in {status}")


def reset_peak_rss(clear_refs: Union[str, Path] = "/proc/self/clear_refs") -> bool:
    """Reset ``VmHWM`` to the current resident size (Linux >= 4.0); False where that is refused."""
    try:
        with open(clear_refs, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mem_available_gib(meminfo: Union[str, Path] = "/proc/meminfo") -> float:
    """Memory the machine can give without swapping, in GiB: ``MemAvailable`` of /proc/meminfo.

    The one fallback, where that file or field is missing (not Linux, or a kernel older than
    3.14): the free physical pages (``os.sysconf("SC_AVPHYS_PAGES")``), which leave out the page
    cache the kernel could reclaim, so a memory cap derived from them errs on the small side.
    Raises ``OSError`` where neither exists (then pass the benchmark an explicit limit).
    """
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB
    except (ValueError, OSError, AttributeError):
        raise OSError(f"available memory unknown: {meminfo} has no MemAvailable and sysconf has no "
                      f"SC_AVPHYS_PAGES; give the memory limit explicitly") from None


def max_rss_bytes() -> int:
    """The process's peak resident size since it started (``ru_maxrss``), in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class PeakMemory:
    """``with PeakMemory(device) as m: work()``, then ``m.peak_bytes``: the peak memory of the
    work above the level at the start of the block.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated at the start (the
    device is synchronised at both ends). CPU: the peak resident size (``VmHWM``, reset at the
    start) minus the resident size at the start; where the peak cannot be reset it falls back
    to ``ru_maxrss``, the peak since the process started (``kind`` says which was used).
    """

    def __init__(self, device: Union[str, torch.device] = "cpu") -> None:
        self.device = torch.device(device)
        self.kind: Optional[str] = None
        self.base = 0
        self.peak_bytes: Optional[int] = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.kind = "torch.cuda.max_memory_allocated"
        else:
            self.kind = "VmHWM" if reset_peak_rss() else "ru_maxrss"
            self.base = status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "VmHWM":
            peak = status_kib("VmHWM") * 1024
        else:
            peak = max_rss_bytes()
        self.peak_bytes = peak - self.base


OOM_TEXTS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory", "bad_alloc",
             "memory allocation failed")


def out_of_memory(exc: BaseException) -> Optional[str]:
    """The first line of ``exc``'s message (at most 200 characters) when it reports running out
    of memory (``MemoryError``, CUDA or CPU allocator failures), else ``None``."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    if isinstance(exc, MemoryError) or isinstance(exc, torch.OutOfMemoryError):
        return text
    return text if any(s in text.lower() for s in OOM_TEXTS) else None
