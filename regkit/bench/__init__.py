"""Benchmark machinery shared by ``scripts/bench_*.py`` and the other scripts that write measured
tables into docs/. The scripts parse arguments and call this package; what they measure lives here.

Shared pieces (imported here, light):

* :mod:`regkit.bench.machine`: what a run was measured on (CPU model, cores, load average,
  torch version, device name, date);
* :mod:`regkit.bench.memory`: ``/proc/self/status`` fields, the ``VmHWM`` reset, available memory,
  :class:`~regkit.bench.memory.PeakMemory`, out-of-memory detection;
* :mod:`regkit.bench.timing`: timed calls (warm-up excluded, CUDA synchronised; fastest, median),
  methods taking turns;
* :mod:`regkit.bench.report`: generated sections of markdown files (rewritten atomically),
  markdown tables, CSV files;
* :mod:`regkit.bench.config`: run configs composed as ``train.py`` composes them.

One module per benchmark (import it by name; each pulls in what it measures):
:mod:`~regkit.bench.switches` (the trainer's speed switches, through ``Trainer.fit``),
:mod:`~regkit.bench.epoch_time` (epoch times from training runs' logs), :mod:`~regkit.bench.loss`
(the LNCC losses alone), :mod:`~regkit.bench.metrics` (evaluation metrics),
:mod:`~regkit.bench.distill` (teacher vs student).
"""
from regkit.bench.machine import Machine, cpu_model, describe_machine, device_name, load_average
from regkit.bench.memory import PeakMemory, mem_available_gib, out_of_memory, reset_peak_rss, status_kib
from regkit.bench.report import (command_line, markdown_table, markers, read_section, replace_section, write_csv,
                                 write_text)
from regkit.bench.timing import Timings, interleave, time_calls, timed_call

__all__ = [
    "Machine", "cpu_model", "describe_machine", "device_name", "load_average",
    "PeakMemory", "mem_available_gib", "out_of_memory", "reset_peak_rss", "status_kib",
    "command_line", "markdown_table", "markers", "read_section", "replace_section", "write_csv", "write_text",
    "Timings", "interleave", "time_calls", "timed_call",
]
