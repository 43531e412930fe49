"""LNCC benchmark: forward + backward time and peak memory of the loss alone, side by side.

Methods: ``lncc`` (five convolutions), ``lncc_group`` (one grouped convolution, FastLNCC
Algorithm 2), ``lncc_fast`` (regkit's separable doubling box filters with an analytic backward)
and, as the peer, MONAI's ``LocalNormalizedCrossCorrelationLoss(kernel_type="rectangular")``,
on a brain-like synthetic pair (the first pair of ``regkit.data.synthetic``). Only the warped
image needs a gradient, as in training. This measures the loss, not a training step (the epoch
table, ``scripts/epoch_time_table.py``, measures the loss's share of training).

* Time: median of the timed calls of ``loss(warped, fixed).backward()``, after one warm-up call
  per method; the methods take turns call by call, so machine noise hits them alike; CUDA is
  synchronised around every call. TF32 is off unless allowed.
* Peak memory: each method runs once more in a fresh subprocess (:func:`child_memory`): the
  peak above the level just before the call (:class:`regkit.bench.memory.PeakMemory`; on the
  CPU glibc is told to return freed blocks at once). A method that runs out of memory (the
  address space capped at ``mem_limit_gb`` above its size on the CPU, so the system OOM killer
  is not involved) is reported as OOM and left out of the timing.
* Accuracy: the float32 value and gradient against float64 of the same definition (regkit's
  methods against ``lncc_fast`` in float64, MONAI against MONAI in float64): relative value
  error and ``max|g32 - g64| / max|g64|``, on three pairs at one size.
* Equality (float64, a small size): value and gradient of every method against ``lncc``.
* Memory traffic of ``lncc_fast``: the bytes its forward + backward moves, counted op by op;
  on CUDA divided by the measured copy bandwidth to give the bandwidth bound.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import resource
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import regkit
from regkit.bench.machine import device_name
from regkit.bench.memory import GiB, PeakMemory, mem_available_gib, out_of_memory, status_kib
from regkit.bench.report import fmt_seconds, markdown_table, write_csv
from regkit.bench.timing import interleave, timed_call
from regkit.data.io import atomic_write
from regkit.data.synthetic import synthetic_pair

import monai
from monai.losses import LocalNormalizedCrossCorrelationLoss

METHODS = ("lncc", "lncc_group", "lncc_fast", "monai")
SECTION = "bench_loss"
MiB = 2 ** 20
CSV_FIELDS = ["device", "size", "method", "window", "median_s", "calls", "times_s", "speedup_vs_group",
              "speedup_vs_lncc", "peak_mib", "memory_note", "value", "value_rel_err", "grad_rel_err"]
Log = Callable[[str], None]


def log(msg: str) -> None:
    print(f"[bench_loss] {msg}", file=sys.stderr, flush=True)


def build(method: str, window: int) -> torch.nn.Module:
    if method == "monai":
        return LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=window, kernel_type="rectangular")
    return regkit.create_loss(method, window=window)


def available_methods(methods: Sequence[str]) -> List[str]:
    return [m for m in methods if m != "monai" or monai is not None]


def set_tf32(allow: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def size_text(shape: Sequence[int]) -> str:
    return "×".join(map(str, shape))


# ----------------------------------------------------------------------------- data
def make_pair(shape: Sequence[int], seed: int = 0) -> Dict[str, torch.Tensor]:
    """The synthetic atlas (moving) and first subject (fixed), float32 ``(1, 1, *shape)`` in [0, 1]."""
    moving, fixed = synthetic_pair(shape, seed)
    return {"moving": moving[None, None].float(), "fixed": fixed[None, None].float()}


def cached_pair(shape: Sequence[int], cache: Path, say: Log = log) -> Tuple[Dict[str, torch.Tensor], Path]:
    path = Path(cache) / f"pair_{'x'.join(map(str, shape))}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True), path
    say(f"generating the synthetic pair {tuple(shape)} (once; cached in {cache})")
    pair = make_pair(shape)
    atomic_write(path, lambda tmp: torch.save(pair, tmp))
    return pair, path


# ----------------------------------------------------------------------------- memory (subprocess)
def cap_address_space(device: torch.device, limit_gb: float) -> None:
    """CPU: cap this process's address space at its current size + ``limit_gb``, so that running
    out fails inside it (reported as OOM) instead of waking the system OOM killer, which may
    pick another process. (Float64 convolutions on the CPU take a slow path with a w³-fold
    im2col buffer: 21 GB for lncc at 80x96x112.)"""
    if device.type == "cpu":
        cap = int(status_kib("VmSize") * 1024 + limit_gb * GiB)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def child_memory(method: str, data: str, device: str, window: int, limit_gb: float, tf32: bool) -> Dict[str, Any]:
    """Run in a fresh process: one forward + backward; ``{"peak_mib": x}`` or ``{"oom": why}``."""
    set_tf32(tf32)
    dev = torch.device(device)
    pair = torch.load(data, weights_only=True)
    loss = build(method, window).to(dev)
    tiny = torch.rand(1, 1, 12, 12, 12, device=dev, requires_grad=True)
    loss(tiny, tiny.detach() * 0.5).backward()  # library set-up (threads, kernels) is not the method's
    warped = pair["moving"].to(dev).requires_grad_()
    fixed = pair["fixed"].to(dev)
    cap_address_space(dev, limit_gb)
    try:
        with PeakMemory(dev) as meter:
            if meter.kind == "ru_maxrss":
                raise OSError("cannot reset VmHWM through /proc/self/clear_refs")
            loss(warped, fixed).backward()
    except (RuntimeError, MemoryError) as err:
        if out_of_memory(err) is None:
            raise
        return {"oom": out_of_memory(err)}
    return {"peak_mib": meter.peak_bytes / MiB}


def child_equality(methods: Sequence[str], data: str, device: str, window: int, limit_gb: float) -> Dict[str, Any]:
    """Run in a fresh process: the float64 equality check; ``{"rows": ...}`` or ``{"oom": why}``."""
    dev = torch.device(device)
    pair = torch.load(data, weights_only=True)
    cap_address_space(dev, limit_gb)
    try:
        return {"rows": equality_check(methods, pair, dev, window)}
    except (RuntimeError, MemoryError) as err:
        if out_of_memory(err) is None:
            raise
        return {"oom": out_of_memory(err)}


def run_child(child: Sequence[str], task: str, arg: str, data: Path, device: torch.device, window: int,
              limit_gb: float, tf32: bool) -> Dict[str, Any]:
    """``task`` ("memory" or "equality") in a fresh process started as ``child`` (the script:
    ``[python, scripts/bench_loss.py]``, which answers ``--child-<task>`` with one JSON line);
    its answer, or the reason for none."""
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # freed blocks go back to the OS: RSS follows live memory
    cmd = [*child, f"--child-{task}", arg, "--child-data", str(data), "--child-device", str(device),
           "--window", str(window), "--mem-limit-gb", str(limit_gb)] + (["--tf32"] if tf32 else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode < 0:
        return {"oom": f"killed by signal {-proc.returncode}"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"error": tail[0][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- timing and accuracy
def loss_call(loss: torch.nn.Module, warped: torch.Tensor, fixed: torch.Tensor) -> Callable[[], Tuple[float, Any]]:
    """One forward + backward on a fresh leaf copy of ``warped``: returns (value, gradient)."""
    def call():
        x = warped.detach().clone().requires_grad_()
        value = loss(x, fixed)
        value.backward()
        return value.item(), x.grad

    return call


def run_once(loss, warped, fixed, device) -> Tuple[float, float, torch.Tensor]:
    seconds, (value, grad) = timed_call(loss_call(loss, warped, fixed), device)
    return seconds, value, grad


def time_methods(methods: Sequence[str], pair, device, window, reps: int, budget_s: float,
                 say: Log = log) -> Dict[str, Dict[str, Any]]:
    """Warm-up once each, then timed calls in turns: at least 2 per method, more (up to
    ``reps``) while a method's calls fit in ``budget_s``. Per method: times, value, grad."""
    warped, fixed = pair["moving"].to(device), pair["fixed"].to(device)
    calls = {m: loss_call(build(m, window).to(device), warped, fixed) for m in methods}
    counts = {}
    for m in methods:
        say(f"  warm-up {m}")
        first, _ = timed_call(calls[m], device)
        counts[m] = max(2, min(reps, int(budget_s // max(first, 1e-9))))
    timed = interleave(calls, counts, device, on_round=lambda k, n: say(f"  timed round {k}/{n}"))
    return {m: {"times": t.times, "value": t.result[0], "grad": t.result[1]} for m, t in timed.items()}


def float64_reference(method: str, pair, device, window) -> Tuple[float, torch.Tensor]:
    ref = "monai" if method == "monai" else "lncc_fast"  # lncc_fast == lncc to float64 round-off
    x = pair["moving"].to(device).double()
    return loss_call(build(ref, window).to(device), x, pair["fixed"].to(device).double())()


def rel_errors(value32: float, grad32: torch.Tensor, value64: float, grad64: torch.Tensor) -> Tuple[float, float]:
    v = abs(value32 - value64) / abs(value64)
    g = ((grad32.double() - grad64).abs().max() / grad64.abs().max()).item()
    return v, g


def equality_check(methods, pair, device, window) -> List[Dict[str, Any]]:
    """float64 value and gradient of every method against ``lncc``."""
    x, y = pair["moving"].to(device).double(), pair["fixed"].to(device).double()
    results = {m: loss_call(build(m, window).to(device), x, y)() for m in methods}
    v0, g0 = results["lncc"]
    return [{"method": m, "value": v, "abs_dvalue": abs(v - v0),
             "max_dgrad_rel": ((g - g0).abs().max() / g0.abs().max()).item()} for m, (v, g) in results.items()]


def accuracy_table(methods, pair, device, window) -> List[Dict[str, Any]]:
    """float32 against float64 (same definition) on three pairs: the brain-like pair, the same
    with an intensity offset of 100, and uniform noise (J = (I + noise) / 2)."""
    gen = torch.Generator().manual_seed(0)
    noise_i = torch.rand(pair["moving"].shape, generator=gen)
    noise_j = (noise_i + torch.rand(pair["moving"].shape, generator=gen)) / 2
    cases = {"brain-like pair": (pair["moving"], pair["fixed"]),
             "brain-like pair + 100": (pair["moving"] + 100, pair["fixed"] + 100),
             "uniform noise": (noise_i, noise_j)}
    out = []
    for case, (mov, fix) in cases.items():
        refs = {}
        for m in methods:
            key = "monai" if m == "monai" else "lncc_fast"
            if key not in refs:
                refs[key] = float64_reference(key, {"moving": mov, "fixed": fix}, device, window)
            _, v, g = run_once(build(m, window).to(device), mov.to(device), fix.to(device), device)
            ve, ge = rel_errors(v, g.cpu(), refs[key][0], refs[key][1].cpu())
            out.append({"case": case, "method": m, "value_rel_err": ve, "grad_rel_err": ge})
    return out


# ----------------------------------------------------------------------------- memory traffic
class _Traffic(TorchDispatchMode):
    """Counts bytes read + written per aten op (see :func:`count_traffic`)."""

    NO_READ = {"fill_", "zero_", "copy_"}
    ALLOCATIONS = {"empty", "empty_like", "new_empty", "empty_strided"}  # nothing written yet

    def __init__(self):
        super().__init__()
        self.total, self.per_op = 0, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        rets = schema.returns
        if rets and rets[0].alias_info is not None and not rets[0].alias_info.is_write:
            return out  # a view
        name = schema.name.split("::")[-1]
        if name in self.ALLOCATIONS:
            return out
        moved = 0
        values = list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]
        for arg, value in zip(schema.arguments, values):
            if not isinstance(value, torch.Tensor):
                continue
            size = value.numel() * value.element_size()
            if arg.alias_info is not None and arg.alias_info.is_write:
                moved += size  # the write
                if arg.kwarg_only or name in self.NO_READ:
                    continue  # out= and fill targets are not read
            moved += size  # the read
        if not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    moved += o.numel() * o.element_size()
        self.total += moved
        self.per_op[name] += moved
        return out


def count_traffic(fn: Callable[[], None]) -> Tuple[int, Counter]:
    """Bytes read + written by every aten op ``fn`` runs (views are free; each tensor operand is
    read once, each result or in-place/``out=`` target written once; fills and copies do not read
    their target). Returns the total and the bytes per op name."""
    mode = _Traffic()
    with mode:
        fn()
    return mode.total, mode.per_op


def lncc_fast_traffic(shape: Sequence[int], window: int) -> Tuple[int, Counter]:
    """Bytes moved by lncc_fast's forward + backward (float32, only the warped image needing a
    gradient), in total and per aten op. The same ops run on every device."""
    loss = regkit.create_loss("lncc_fast", window=window)
    x = torch.rand(1, 1, *shape).requires_grad_()
    j = torch.rand(1, 1, *shape)
    return count_traffic(lambda: loss(x, j).backward())


def copy_bandwidth(device: torch.device, nbytes: int = 2 ** 30) -> float:
    """Achieved bytes/s of a large device-to-device copy (read + write), over 10 copies."""
    a = torch.empty(nbytes // 4, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    seconds, _ = timed_call(lambda: [b.copy_(a) for _ in range(10)], device)
    return 2 * nbytes * 10 / seconds


# ----------------------------------------------------------------------------- one size, all sizes
def bench_size(shape: Sequence[int], device: torch.device, methods: Sequence[str], window: int, reps: int,
               budget_s: float, limit_gb: float, tf32: bool, cache: Path, child: Sequence[str],
               say: Log = log) -> Tuple[List[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """Memory (subprocesses), timing and float32 accuracy of every method at one size; the rows,
    and the memory traffic of lncc_fast (with its measured time on CUDA)."""
    size = size_text(shape)
    pair, data_path = cached_pair(shape, cache, say)
    memory = {}
    for m in methods:
        say(f"{device.type} {size}: peak memory of {m} (subprocess)")
        memory[m] = run_child(child, "memory", m, data_path, device, window, limit_gb, tf32)
    runnable = [m for m in methods if "peak_mib" in memory[m]]
    say(f"{device.type} {size}: timing {', '.join(runnable)}")
    timed = time_methods(runnable, pair, device, window, reps, budget_s, say) if runnable else {}
    refs = {}
    for m in runnable:
        key = "monai" if m == "monai" else "regkit"
        if key not in refs:
            say(f"{device.type} {size}: float64 reference ({'monai' if key == 'monai' else 'lncc_fast'})")
            refs[key] = float64_reference(m, pair, device, window)
    medians = {m: statistics.median(timed[m]["times"]) for m in runnable}
    rows = []
    for m in methods:
        row = {"device": device.type, "size": size, "method": m, "window": window}
        mem = memory[m]
        row["peak_mib"] = mem.get("peak_mib")
        row["memory_note"] = ("OOM: " + mem["oom"]) if "oom" in mem else mem.get("error")
        if m in timed:
            row["median_s"] = medians[m]
            row["calls"] = len(timed[m]["times"])
            row["times_s"] = " ".join(f"{t:.4f}" for t in timed[m]["times"])
            row["speedup_vs_group"] = medians["lncc_group"] / medians[m] if "lncc_group" in medians else None
            row["speedup_vs_lncc"] = medians["lncc"] / medians[m] if "lncc" in medians else None
            ref = refs["monai" if m == "monai" else "regkit"]
            row["value"] = timed[m]["value"]
            row["value_rel_err"], row["grad_rel_err"] = rel_errors(
                timed[m]["value"], timed[m]["grad"].cpu(), ref[0], ref[1].cpu())
        rows.append(row)
    traffic = None
    if "lncc_fast" in methods:
        total, per_op = lncc_fast_traffic(shape, window)
        traffic = {"size": size, "voxels": pair["moving"].numel(), "bytes": total, "per_op": per_op,
                   "measured_s": medians.get("lncc_fast") if device.type == "cuda" else None}
    return rows, traffic


def default_mem_limit_gb() -> float:
    """What a CPU method may add: 80% of the memory available now, at most 16 GiB."""
    return round(min(16.0, 0.8 * mem_available_gib()), 1)


def run(sizes: Sequence[Sequence[int]], devices: Sequence[torch.device], methods: Sequence[str], window: int,
        reps: int, budget_s: float, mem_limit_gb: float, equality_size: Sequence[int],
        accuracy_size: Sequence[int], tf32: bool, csv_path: Path, cache: Path, child: Sequence[str],
        command: str, say: Log = log) -> str:
    """The whole benchmark; returns the markdown section (the CSV is rewritten after every size,
    so a later crash loses nothing measured)."""
    set_tf32(tf32)
    methods = available_methods(methods)
    meta = {"command": command, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "monai": monai.__version__, "tf32": "on" if tf32 else "off"}
    say(f"memory cap per CPU method: {mem_limit_gb} GiB; torch threads: {torch.get_num_threads()}")
    rows: List[Dict[str, Any]] = []
    equality: Dict[str, Any] = {}
    accuracy: Dict[str, Any] = {}
    traffic: Dict[str, Dict[str, Any]] = {}
    for device in devices:
        meta[f"device:{device.type}"] = device_name(device)
        bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
        for shape in sizes:
            size_rows, t = bench_size(shape, device, methods, window, reps, budget_s, mem_limit_gb, tf32, cache,
                                      child, say)
            rows += size_rows
            if t is not None:
                if bandwidth and t.get("measured_s"):
                    t.update(bandwidth=bandwidth, bound_s=t["bytes"] / bandwidth)
                if t["size"] not in traffic or t.get("bandwidth"):
                    traffic[t["size"]] = t
            write_csv(csv_path, rows, CSV_FIELDS)
        if "lncc" in methods:
            say(f"{device.type}: float64 equality check at {tuple(equality_size)} (subprocess)")
            _, data_path = cached_pair(equality_size, cache, say)
            answer = run_child(child, "equality", ",".join(methods), data_path, device, window, mem_limit_gb, tf32)
            equality[device.type] = (size_text(equality_size), answer.get("rows") or [
                {"method": m, "note": answer.get("oom") or answer.get("error")} for m in methods])
        say(f"{device.type}: float32 accuracy at {tuple(accuracy_size)}")
        pair, _ = cached_pair(accuracy_size, cache, say)
        accuracy[device.type] = (size_text(accuracy_size), accuracy_table(methods, pair, device, window))
    return render_markdown(meta, rows, equality, accuracy, list(traffic.values()))


# ----------------------------------------------------------------------------- report
def render_markdown(meta: Dict[str, str], rows: List[Dict[str, Any]], equality: Dict[str, Any],
                    accuracy: Dict[str, Any], traffic: List[Dict[str, Any]]) -> str:
    out = io.StringIO()
    w = out.write
    w("## Loss: LNCC forward + backward\n\n")
    w(f"`{meta['command']}` — {meta['date']}, torch {meta['torch']}, MONAI {meta['monai']}.\n")
    w("Window 9, batch 1, a brain-like synthetic pair (atlas -> deformed subject, intensities in [0, 1]); "
      "only the warped image needs a gradient. Time: median of the timed calls after one warm-up call, "
      "methods taking turns; ratios are within one run. Peak memory: one call in a fresh subprocess "
      "(CPU: peak resident memory above the level before the call; CUDA: `max_memory_allocated`). "
      f"TF32 {'allowed' if meta['tf32'] == 'on' else 'off'}. `monai` is "
      "`LocalNormalizedCrossCorrelationLoss(kernel_type=\"rectangular\", kernel_size=9)`, whose "
      "definition differs (variances clamped at 1e-5 instead of eps in the denominator; its value is in "
      "the equality table).\n\n")
    for device in dict.fromkeys(r["device"] for r in rows):
        w(f"### {device}: {meta['device:' + device]}\n\n")
        ratio = lambda r, k: f"{r[k]:.1f}×" if r.get(k) else "–"  # noqa: E731
        err = lambda r, k: f"{r[k]:.1e}" if r.get(k) is not None else "–"  # noqa: E731
        w(markdown_table(
            ["size", "method", "fwd+bwd", "calls", "lncc_group / method", "lncc / method", "peak memory",
             "float32 value rel. err", "float32 grad rel. err"],
            [[r["size"], f"`{r['method']}`", fmt_seconds(r.get("median_s")), r.get("calls", 0),
              ratio(r, "speedup_vs_group"), ratio(r, "speedup_vs_lncc"),
              f"{r['peak_mib']:.0f} MiB" if r.get("peak_mib") is not None else r.get("memory_note") or "–",
              err(r, "value_rel_err"), err(r, "grad_rel_err")] for r in rows if r["device"] == device]))
        w("\n")
        if device in equality:
            size, items = equality[device]
            w(f"Equality in float64 at {size}, against `lncc`:\n\n")
            w(markdown_table(["method", "value", "abs. value diff", "max grad diff / max grad"],
                             [[f"`{e['method']}`", f"{e['value']:.12f}", f"{e['abs_dvalue']:.1e}",
                               f"{e['max_dgrad_rel']:.1e}"] if "value" in e
                              else [f"`{e['method']}`", f"not run: {e.get('note')}", "–", "–"] for e in items]))
            if any(e["method"] == "monai" for e in items):
                w("\n`monai` differs from `lncc` by its definition, not by round-off.\n")
            w("\n")
        if device in accuracy:
            size, items = accuracy[device]
            w(f"Float32 against float64 of the same definition at {size} (value: relative error; gradient: "
              "max error / max gradient):\n\n")
            w(markdown_table(["pair", "method", "value rel. err", "grad rel. err"],
                             [[a["case"], f"`{a['method']}`", f"{a['value_rel_err']:.1e}", f"{a['grad_rel_err']:.1e}"]
                              for a in items]))
            w("\n")
    if traffic:
        w("Memory traffic of `lncc_fast` forward + backward (float32, gradient for the warped image only), "
          "counted op by op: every operand read once, every result written once, the same ops on every device "
          "(derivation by stage below). The bound is bytes / the measured device-to-device copy bandwidth:\n\n")
        table = []
        for t in traffic:
            table.append([
                t["size"], f"{t['bytes'] / GiB:.2f} GiB", f"{t['bytes'] / t['voxels']:.0f} B",
                f"{t['bytes'] / t['voxels'] / 4:.0f}",
                f"{t['bandwidth'] / 1e9:.0f} GB/s" if t.get("bandwidth") else "no GPU",
                fmt_seconds(t["bound_s"]) if t.get("bound_s") else "–",
                fmt_seconds(t["measured_s"]) if t.get("measured_s") else "–",
                f"{t['measured_s'] / t['bound_s']:.1f}×" if t.get("bound_s") and t.get("measured_s") else "–"])
        w(markdown_table(["size", "bytes moved", "per voxel", "volumes of float32", "copy bandwidth", "bound",
                          "measured", "measured / bound"], table))
        w("\n")
    return out.getvalue()
