#!/usr/bin/env python
"""LNCC benchmark: forward + backward time and peak memory, side by side in one run.

Methods: ``lncc`` (five convolutions), ``lncc_group`` (one grouped convolution, FastLNCC
Algorithm 2), ``lncc_fast`` (regkit's separable doubling box filters with an analytic backward) and, as the
peer, MONAI's ``LocalNormalizedCrossCorrelationLoss(kernel_type="rectangular")``. Window 9, batch
1, a brain-like synthetic pair (``regkit.data.synthetic``), at 80x96x112 and 160x192x224, on the
CPU and on CUDA when present. Only the warped image needs a gradient, as in training.

* Time: median of the timed calls of ``loss(warped, fixed).backward()``, after one warm-up call
  per method; the methods take turns call by call, so machine noise hits them alike; CUDA is
  synchronised around every call. TF32 is off throughout (``--tf32`` allows it for timing).
* Peak memory: each method runs once more in a fresh subprocess. CPU: the peak resident memory
  above the level just before the call (``VmHWM`` reset through ``/proc/self/clear_refs``, glibc
  told to return freed blocks at once); CUDA: ``max_memory_allocated`` above the level before.
  A method that runs out of memory (address space capped at ``--mem-limit-gb`` on the CPU, so the
  system OOM killer is not involved) is reported as OOM and left out of the timing.
* Accuracy: the float32 value and gradient against float64 of the same definition (regkit's
  methods against ``lncc_fast`` in float64, MONAI against MONAI in float64): relative value error
  and ``max|g32 - g64| / max|g64|``.
* Equality (float64, the small size): value and gradient of every method against ``lncc``.
* Float32 accuracy at the small size on three pairs: the brain-like one, the same with an
  intensity offset of 100, and uniform noise.
* Memory traffic of ``lncc_fast``: the bytes its forward + backward moves, counted op by op
  (every operand read once, every result written once; the same ops on every device); on CUDA this is
  divided by the measured copy bandwidth to give the bandwidth bound of the passes it makes.

    .venv/bin/python scripts/bench_loss.py                          # print the markdown
    .venv/bin/python scripts/bench_loss.py --out docs/benchmarks.md # ... and update that section
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import regkit  # noqa: E402
from proc_memory import reset_peak_rss, status_kib  # noqa: E402  (scripts/ is on sys.path when run as a script)
from regkit.data.io import atomic_write  # noqa: E402

METHODS = ("lncc", "lncc_group", "lncc_fast", "monai")
BEGIN, END = "<!-- bench_loss:begin -->", "<!-- bench_loss:end -->"
MiB = 2 ** 20


def log(msg: str) -> None:
    print(f"[bench_loss] {msg}", file=sys.stderr, flush=True)


def build(method: str, window: int) -> torch.nn.Module:
    if method == "monai":
        from monai.losses import LocalNormalizedCrossCorrelationLoss

        return LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=window, kernel_type="rectangular")
    return regkit.create_loss(method, window=window)


def set_tf32(allow: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- data
def make_pair(shape: Sequence[int], seed: int = 0) -> Dict[str, torch.Tensor]:
    """A brain-like atlas (moving) and a deformed subject (fixed), float32 (1, 1, *shape) in [0, 1]."""
    from regkit.data.synthetic import make_template, random_deformation, render
    from regkit.spatial import warp

    gen = torch.Generator().manual_seed(seed)
    template = make_template(shape)
    moving = render(template, gen)
    phi = random_deformation(shape, gen, 0.12 * sum(shape) / 3)
    labels = warp(template[None, None].double(), phi, mode="nearest")[0, 0].long()
    fixed = render(labels, gen)
    return {"moving": moving[None, None].float(), "fixed": fixed[None, None].float()}


def cached_pair(shape: Sequence[int], cache: Path) -> Tuple[Dict[str, torch.Tensor], Path]:
    path = cache / f"pair_{'x'.join(map(str, shape))}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True), path
    log(f"generating the synthetic pair {tuple(shape)} (once; cached in {cache})")
    pair = make_pair(shape)
    atomic_write(path, lambda tmp: torch.save(pair, tmp))
    return pair, path


# ----------------------------------------------------------------------------- memory (subprocess)
def _status_mib(key: str) -> float:
    return status_kib(key) / 1024


def cap_address_space(device: torch.device, limit_gb: float) -> None:
    """CPU: cap this process's address space at its current size + ``limit_gb``, so that running
    out fails inside it (reported as OOM) instead of waking the system OOM killer, which may
    pick another process. (Float64 convolutions on the CPU take a slow path with a w³-fold
    im2col buffer: 21 GB for lncc at 80x96x112.)"""
    if device.type == "cpu":
        cap = int(_status_mib("VmSize") * MiB + limit_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def oom_message(err: BaseException) -> Optional[str]:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text[:200] if isinstance(err, MemoryError) or "memory" in text.lower() else None


def child_memory(method: str, data: str, device: str, window: int, limit_gb: float, tf32: bool) -> None:
    """Run in a fresh process: one forward + backward; print {"peak_mib": x} or {"oom": why}."""
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
        if dev.type == "cuda":
            sync(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            loss(warped, fixed).backward()
            sync(dev)
            peak = (torch.cuda.max_memory_allocated(dev) - base) / MiB
        else:
            base = _status_mib("VmRSS")
            if not reset_peak_rss():  # VmHWM back to the current resident size
                raise OSError("cannot reset VmHWM through /proc/self/clear_refs")
            loss(warped, fixed).backward()
            peak = _status_mib("VmHWM") - base
    except (RuntimeError, MemoryError) as err:
        if oom_message(err) is None:
            raise
        print(json.dumps({"oom": oom_message(err)}))
        return
    print(json.dumps({"peak_mib": peak}))


def child_equality(methods: Sequence[str], data: str, device: str, window: int, limit_gb: float) -> None:
    """Run in a fresh process: the float64 equality check; print its rows or {"oom": why}."""
    dev = torch.device(device)
    pair = torch.load(data, weights_only=True)
    cap_address_space(dev, limit_gb)
    try:
        rows = equality_check(methods, pair, dev, window)
    except (RuntimeError, MemoryError) as err:
        if oom_message(err) is None:
            raise
        print(json.dumps({"oom": oom_message(err)}))
        return
    print(json.dumps({"rows": rows}))


def run_child(task: str, arg: str, data: Path, device: torch.device, window: int, limit_gb: float,
              tf32: bool) -> Dict[str, object]:
    """``task`` ("memory" or "equality") in a fresh process; its JSON answer, or the reason for none."""
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # freed blocks go back to the OS: RSS follows live memory
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--child-{task}", arg, "--child-data", str(data),
           "--child-device", str(device), "--window", str(window), "--mem-limit-gb", str(limit_gb)]
    if tf32:
        cmd.append("--tf32")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode < 0:
        return {"oom": f"killed by signal {-proc.returncode}"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"error": tail[0][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- timing
def run_once(loss, warped, fixed, device) -> Tuple[float, float, torch.Tensor]:
    x = warped.detach().clone().requires_grad_()
    sync(device)
    t0 = time.perf_counter()
    value = loss(x, fixed)
    value.backward()
    sync(device)
    return time.perf_counter() - t0, value.item(), x.grad


def time_methods(methods: Sequence[str], pair, device, window, reps: int, budget_s: float):
    """Warm-up once each, then timed calls in turns. Returns per method (times, value, grad)."""
    losses = {m: build(m, window).to(device) for m in methods}
    warped, fixed = pair["moving"].to(device), pair["fixed"].to(device)
    out, counts = {}, {}
    for m in methods:
        log(f"  warm-up {m}")
        t, v, g = run_once(losses[m], warped, fixed, device)
        # at least 2 timed calls; more (up to reps) while a method's calls fit in the budget
        counts[m] = max(2, min(reps, int(budget_s // max(t, 1e-9))))
        out[m] = {"times": [], "value": v, "grad": g}
    for k in range(max(counts.values())):
        for m in methods:
            if k < counts[m]:
                t, v, g = run_once(losses[m], warped, fixed, device)
                out[m]["times"].append(t)
                out[m]["value"], out[m]["grad"] = v, g
        log(f"  timed round {k + 1}/{max(counts.values())}")
    return out


def float64_reference(method: str, pair, device, window) -> Tuple[float, torch.Tensor]:
    ref = "monai" if method == "monai" else "lncc_fast"  # lncc_fast == lncc to float64 round-off
    loss = build(ref, window).to(device)
    x = pair["moving"].to(device).double().requires_grad_()
    value = loss(x, pair["fixed"].to(device).double())
    value.backward()
    return value.item(), x.grad


def rel_errors(value32: float, grad32: torch.Tensor, value64: float, grad64: torch.Tensor) -> Tuple[float, float]:
    v = abs(value32 - value64) / abs(value64)
    g = ((grad32.double() - grad64).abs().max() / grad64.abs().max()).item()
    return v, g


def equality_check(methods, pair, device, window) -> List[Dict[str, object]]:
    """float64 value and gradient of every method against ``lncc``."""
    results = {}
    for m in methods:
        loss = build(m, window).to(device)
        x = pair["moving"].to(device).double().requires_grad_()
        value = loss(x, pair["fixed"].to(device).double())
        value.backward()
        results[m] = (value.item(), x.grad)
    v0, g0 = results["lncc"]
    return [{"method": m, "value": v, "abs_dvalue": abs(v - v0),
             "max_dgrad_rel": ((g - g0).abs().max() / g0.abs().max()).item()} for m, (v, g) in results.items()]


def accuracy_table(methods, pair, device, window) -> List[Dict[str, object]]:
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
def count_traffic(fn: Callable[[], None]) -> Tuple[int, Counter]:
    """Bytes read + written by every aten op ``fn`` runs (views are free; each tensor operand is
    read once, each result or in-place/``out=`` target written once; fills and copies do not read
    their target). Returns the total and the bytes per op name."""
    from torch.utils._python_dispatch import TorchDispatchMode

    no_read = {"fill_", "zero_", "copy_"}
    allocations = {"empty", "empty_like", "new_empty", "empty_strided"}  # nothing written yet

    class Traffic(TorchDispatchMode):
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
            if name in allocations:
                return out
            moved = 0
            values = list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]
            for arg, value in zip(schema.arguments, values):
                if not isinstance(value, torch.Tensor):
                    continue
                size = value.numel() * value.element_size()
                written = arg.alias_info is not None and arg.alias_info.is_write
                if written:
                    moved += size  # the write
                    if arg.kwarg_only or name in no_read:
                        continue  # out= and fill targets are not read
                moved += size  # the read
            if not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
                for o in (out if isinstance(out, (tuple, list)) else (out,)):
                    if isinstance(o, torch.Tensor):
                        moved += o.numel() * o.element_size()
            self.total += moved
            self.per_op[name] += moved
            return out

    mode = Traffic()
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
    """Achieved bytes/s of a large device-to-device copy (read + write)."""
    a = torch.empty(nbytes // 4, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(device)
    return 2 * nbytes * 10 / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- report
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def fmt_time(t: Optional[float]) -> str:
    if t is None:
        return "–"
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_markdown(meta: Dict[str, str], rows: List[Dict[str, object]], equality: Dict[str, list],
                    accuracy: Dict[str, list], traffic: List[Dict[str, object]]) -> str:
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
        w("| size | method | fwd+bwd | calls | lncc_group / method | lncc / method | peak memory | "
          "float32 value rel. err | float32 grad rel. err |\n|---|---|---|---|---|---|---|---|---|\n")
        for r in (r for r in rows if r["device"] == device):
            mem = f"{r['peak_mib']:.0f} MiB" if r.get("peak_mib") is not None else r.get("memory_note", "–")
            ratio = lambda k: f"{r[k]:.1f}×" if r.get(k) else "–"  # noqa: E731
            err = lambda k: f"{r[k]:.1e}" if r.get(k) is not None else "–"  # noqa: E731
            w(f"| {r['size']} | `{r['method']}` | {fmt_time(r.get('median_s'))} | {r.get('calls', 0)} | "
              f"{ratio('speedup_vs_group')} | {ratio('speedup_vs_lncc')} | {mem} | "
              f"{err('value_rel_err')} | {err('grad_rel_err')} |\n")
        w("\n")
        if device in equality:
            size, items = equality[device]
            w(f"Equality in float64 at {size}, against `lncc`:\n\n")
            w(md_table(["method", "value", "abs. value diff", "max grad diff / max grad"],
                       [[f"`{e['method']}`", f"{e['value']:.12f}", f"{e['abs_dvalue']:.1e}", f"{e['max_dgrad_rel']:.1e}"]
                        if "value" in e else [f"`{e['method']}`", f"not run: {e.get('note')}", "–", "–"]
                        for e in items]))
            if any(e["method"] == "monai" for e in items):
                w("\n`monai` differs from `lncc` by its definition, not by round-off.\n")
            w("\n")
        if device in accuracy:
            size, items = accuracy[device]
            w(f"Float32 against float64 of the same definition at {size} (value: relative error; gradient: "
              "max error / max gradient):\n\n")
            w(md_table(["pair", "method", "value rel. err", "grad rel. err"],
                       [[a["case"], f"`{a['method']}`", f"{a['value_rel_err']:.1e}", f"{a['grad_rel_err']:.1e}"]
                        for a in items]))
            w("\n")
    if traffic:
        w("Memory traffic of `lncc_fast` forward + backward (float32, gradient for the warped image only), "
          "counted op by op: every operand read once, every result written once, the same ops on every device "
          "(derivation by stage below). The bound is bytes / the measured device-to-device copy bandwidth:"
          "\n\n| size | bytes moved | per voxel | volumes of float32 | copy bandwidth | bound | "
          "measured | measured / bound |\n|---|---|---|---|---|---|---|---|\n")
        for t in traffic:
            bw = f"{t['bandwidth'] / 1e9:.0f} GB/s" if t.get("bandwidth") else "no GPU"
            bound = fmt_time(t.get("bound_s")) if t.get("bound_s") else "–"
            meas = fmt_time(t.get("measured_s")) if t.get("measured_s") else "–"
            ratio = f"{t['measured_s'] / t['bound_s']:.1f}×" if t.get("bound_s") and t.get("measured_s") else "–"
            w(f"| {t['size']} | {t['bytes'] / 2 ** 30:.2f} GiB | {t['bytes'] / t['voxels']:.0f} B | "
              f"{t['bytes'] / t['voxels'] / 4:.0f} | {bw} | {bound} | {meas} | {ratio} |\n")
        w("\n")
    return out.getvalue()


def update_doc(path: Path, section: str) -> None:
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def parse_size(text: str) -> Tuple[int, ...]:
    try:
        size = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 80x96x112, got {text!r}") from None
    if len(size) != 3 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"size must be three positive integers, got {text!r}")
    return size


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=parse_size, nargs="+", default=[(80, 96, 112), (160, 192, 224)])
    p.add_argument("--window", type=int, default=9)
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--reps", type=int, default=7, help="most timed calls per method")
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="timed calls per method: as many as fit in this many seconds, at least 2, at most --reps")
    p.add_argument("--mem-limit-gb", type=float, default=None,
                   help="address space a CPU method may add (default: 80%% of MemAvailable, at most 16)")
    p.add_argument("--equality-size", type=parse_size, default=(40, 48, 56),
                   help="size of the float64 equality check (CPU float64 convolutions need a w³-fold "
                        "im2col buffer: about 2.7 GB at the default size, 21 GB at 80x96x112)")
    p.add_argument("--accuracy-size", type=parse_size, default=(80, 96, 112),
                   help="size of the float32 accuracy table")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for timing (default: off)")
    p.add_argument("--csv", type=Path, default=ROOT / "bench_results" / "bench_loss.csv")
    p.add_argument("--out", type=Path, default=None, help="update the loss section of this markdown file")
    p.add_argument("--cache", type=Path, default=ROOT / "bench_results")
    p.add_argument("--child-memory", help=argparse.SUPPRESS)
    p.add_argument("--child-equality", help=argparse.SUPPRESS)
    p.add_argument("--child-data", help=argparse.SUPPRESS)
    p.add_argument("--child-device", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child_memory:
        child_memory(args.child_memory, args.child_data, args.child_device, args.window,
                     args.mem_limit_gb or 16.0, args.tf32)
        return 0
    if args.child_equality:
        child_equality(args.child_equality.split(","), args.child_data, args.child_device, args.window,
                       args.mem_limit_gb or 16.0)
        return 0

    set_tf32(args.tf32)
    devices = [torch.device(d) for d in (args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]))]
    if any(d.type == "cuda" for d in devices) and not torch.cuda.is_available():
        p.error("--devices cuda: CUDA is not available")
    if args.mem_limit_gb is None:
        avail = _meminfo_gb("MemAvailable")
        args.mem_limit_gb = round(min(16.0, 0.8 * avail), 1)
    try:
        import monai
        monai_version = monai.__version__
    except ImportError:
        monai_version = "not installed"
        args.methods = [m for m in args.methods if m != "monai"]
    meta = {
        "command": "scripts/bench_loss.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.date.today().isoformat(), "torch": torch.__version__, "monai": monai_version,
        "tf32": "on" if args.tf32 else "off",
    }
    log(f"memory cap per CPU method: {args.mem_limit_gb} GiB; torch threads: {torch.get_num_threads()}")
    rows: List[Dict[str, object]] = []
    equality: Dict[str, list] = {}
    accuracy: Dict[str, list] = {}
    traffic: Dict[str, Dict[str, object]] = {}
    for device in devices:
        meta[f"device:{device.type}"] = device_name(device)
        bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
        for shape in args.sizes:
            size_rows, t = bench_size(shape, device, args)
            rows += size_rows
            if t is not None:
                size = t["size"]
                if bandwidth and t.get("measured_s"):
                    t.update(bandwidth=bandwidth, bound_s=t["bytes"] / bandwidth)
                if size not in traffic or t.get("bandwidth"):
                    traffic[size] = t
            write_csv(rows, args.csv)  # after every size: a later crash loses nothing measured
        if "lncc" in args.methods:
            log(f"{device.type}: float64 equality check at {args.equality_size} (subprocess)")
            _, data_path = cached_pair(args.equality_size, args.cache)
            answer = run_child("equality", ",".join(args.methods), data_path, device, args.window,
                               args.mem_limit_gb, args.tf32)
            size = "×".join(map(str, args.equality_size))
            equality[device.type] = (size, answer.get("rows") or
                                     [{"method": m, "note": answer.get("oom") or answer.get("error")} for m in args.methods])
        log(f"{device.type}: float32 accuracy at {args.accuracy_size}")
        pair, _ = cached_pair(args.accuracy_size, args.cache)
        accuracy[device.type] = ("×".join(map(str, args.accuracy_size)),
                                 accuracy_table(args.methods, pair, device, args.window))
    md = render_markdown(meta, rows, equality, accuracy, list(traffic.values()))
    print(md)
    log(f"CSV: {args.csv}")
    if args.out:
        update_doc(args.out, md)
        log(f"updated {args.out}")
    return 0


def bench_size(shape: Sequence[int], device: torch.device, args) -> Tuple[List[Dict[str, object]], Optional[dict]]:
    """Memory (subprocesses), timing and float32 accuracy of every method at one size; the rows,
    and the memory traffic of lncc_fast (with its measured time)."""
    size = "×".join(map(str, shape))
    pair, data_path = cached_pair(shape, args.cache)
    memory = {}
    for m in args.methods:
        log(f"{device.type} {size}: peak memory of {m} (subprocess)")
        memory[m] = run_child("memory", m, data_path, device, args.window, args.mem_limit_gb, args.tf32)
    runnable = [m for m in args.methods if "peak_mib" in memory[m]]
    log(f"{device.type} {size}: timing {', '.join(runnable)}")
    timed = time_methods(runnable, pair, device, args.window, args.reps, args.budget_s) if runnable else {}
    refs = {}
    for m in runnable:
        key = "monai" if m == "monai" else "regkit"
        if key not in refs:
            log(f"{device.type} {size}: float64 reference ({'monai' if key == 'monai' else 'lncc_fast'})")
            refs[key] = float64_reference(m, pair, device, args.window)
    medians = {m: statistics.median(timed[m]["times"]) for m in runnable}
    rows = []
    for m in args.methods:
        row = {"device": device.type, "size": size, "method": m, "window": args.window}
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
    if "lncc_fast" in args.methods:
        total, per_op = lncc_fast_traffic(shape, args.window)
        traffic = {"size": size, "voxels": pair["moving"].numel(), "bytes": total, "per_op": per_op,
                   "measured_s": medians.get("lncc_fast") if device.type == "cuda" else None}
    return rows, traffic


CSV_FIELDS = ["device", "size", "method", "window", "median_s", "calls", "times_s", "speedup_vs_group",
              "speedup_vs_lncc", "peak_mib", "memory_note", "value", "value_rel_err", "grad_rel_err"]


def write_csv(rows: List[Dict[str, object]], path: Path) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            wr.writeheader()
            wr.writerows(rows)

    atomic_write(path, write)


def _meminfo_gb(key: str) -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2 ** 20
    return 8.0


if __name__ == "__main__":
    sys.exit(main())
