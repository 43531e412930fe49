"""Linux process-memory readings shared by the benchmark scripts (``bench_models.py``,
``bench_loss.py``): fields of ``/proc/self/status`` and the reset of the peak resident size."""
from __future__ import annotations


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB, e.g. ``VmRSS``, ``VmHWM`` (peak RSS), ``VmSize``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident size (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
