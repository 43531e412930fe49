#!/usr/bin/env python3
"""Measure the trainer's speed switches side by side: precision (fp32 / bf16 / fp16 autocast),
channels_last and torch.compile, on a full training step as regkit's trainer runs it.

    .venv/bin/python scripts/bench_switches.py                        # CPU rows (and CUDA rows if present)
    .venv/bin/python scripts/bench_switches.py --out docs/benchmarks.md  # also update that section

A step is: forward under autocast (the network; field, warping in float32), the loss
(lncc_fast window 9 + grad, float32), backward (fp16 through a GradScaler), Adam step. Every
configuration starts from the same weights. Timing: each configuration first runs ``--warmup``
steps (torch.compile compiles there; that first step is reported separately), then the
configurations take turns one step at a time for ``--steps`` rounds, so that a busy machine
slows all of them alike; the table gives the fastest and the median step, CUDA synchronised
around each step, and the speed ratio of the fastest steps.
Accuracy, at the shared initial weights on one fixed pair: the relative L2 difference of the
predicted field from fp32 and the absolute difference of the loss.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from regkit import create_loss, create_model  # noqa: E402
from regkit.data.io import atomic_write  # noqa: E402
from regkit.device import PRECISIONS, memory_format  # noqa: E402

BEGIN, END = "<!-- bench_switches:begin -->", "<!-- bench_switches:end -->"
# name: (precision, channels_last, compile)
CONFIGS = {
    "fp32": ("fp32", False, False),
    "bf16": ("bf16", False, False),
    "fp16": ("fp16", False, False),
    "channels_last": ("fp32", True, False),
    "bf16 + channels_last": ("bf16", True, False),
    "compile": ("fp32", False, True),
    "compile + channels_last": ("fp32", True, True),
}
# float16 convolutions on the CPU are reference kernels, minutes per step at 64^3: one warm-up
# step and one timed step there, outside the interleaved rounds.
SLOW_ON_CPU = {"fp16"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One configuration: its own copy of the model, optimizer and scaler."""

    def __init__(self, name, base_model, device, args):
        precision, channels_last, compiled = CONFIGS[name]
        self.name, self.device = name, device
        self.dtype = PRECISIONS[precision]
        self.model = copy.deepcopy(base_model).to(device)
        self.fmt = memory_format(3) if channels_last else None
        if self.fmt is not None:
            self.model.to(memory_format=self.fmt)
        self.forward_module = torch.compile(self.model) if compiled else self.model
        self.sim = create_loss("lncc_fast").to(device)
        self.reg = create_loss("grad").to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.times, self.first_step, self.kept = [], None, None

    def inputs(self, x, y):
        x, y = x.to(self.device), y.to(self.device)
        if self.fmt is not None:
            x, y = x.contiguous(memory_format=self.fmt), y.contiguous(memory_format=self.fmt)
        return x, y

    def forward(self, x, y):
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.forward_module(x, y)
        return out, self.sim(out.warped, y) + self.reg(out.flow)

    def step(self, x, y, keep: bool = False) -> float:
        """One timed training step; ``keep`` stores its field and loss (accuracy at these weights)."""
        sync(self.device)
        start = time.perf_counter()
        out, loss = self.forward(x, y)
        if keep:
            self.kept = (out.flow.detach().float(), float(loss.detach()))
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        sync(self.device)
        return time.perf_counter() - start


def bench_device(device: torch.device, names, args):
    torch.manual_seed(0)
    base = create_model(args.model)
    # A flow head like a trained one's (init is ~1e-5, which would make every field ~0).
    torch.nn.init.normal_(base.flow_head.weight, std=1e-2)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 1, args.size, args.size, args.size)
    x, y = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
    runners = [Runner(n, base, device, args) for n in names]

    slow = [r for r in runners if device.type == "cpu" and r.name in SLOW_ON_CPU]
    for r in runners:  # warm-up; the first step includes compilation
        xi, yi = r.inputs(x, y)
        r.first_step = r.step(xi, yi, keep=True)  # its forward ran at the shared initial weights
        for _ in range(0 if r in slow else args.warmup - 1):
            r.step(xi, yi)
        if r in slow:
            r.times.append(r.step(xi, yi))
        print(f"  {device} {r.name}: first step {r.first_step:.2f} s", flush=True)
    if device.type == "cuda":
        peaks = {r.name: 0.0 for r in runners}
    for _ in range(args.steps):  # interleaved
        for r in runners:
            if r in slow:
                continue
            xi, yi = r.inputs(x, y)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            r.times.append(r.step(xi, yi))
            if device.type == "cuda":
                peaks[r.name] = max(peaks[r.name], torch.cuda.max_memory_allocated(device) / 2 ** 20)
    ref_flow, ref_loss = runners[0].kept
    acc = {r.name: (float((r.kept[0] - ref_flow).norm() / ref_flow.norm()), abs(r.kept[1] - ref_loss)) for r in runners}
    base_ms = min(runners[0].times) * 1000
    rows = []
    for r in runners:
        ms, median_ms = min(r.times) * 1000, statistics.median(r.times) * 1000
        peak = f"{peaks[r.name]:.0f}" if device.type == "cuda" else "-"
        label = f"{r.name} (1 step)" if r in slow else r.name
        rows.append(f"| {device.type} | {label} | {ms:.0f} | {median_ms:.0f} | {base_ms / ms:.2f}x | {r.first_step:.1f} | "
                    f"{acc[r.name][0]:.1e} | {acc[r.name][1]:.1e} | {peak} |")
    return rows, ref_loss


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vxm1")
    parser.add_argument("--size", type=int, default=64, help="cubic volume size (default 64)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--devices", default="auto", help="auto (cpu, and cuda if present), cpu or cuda")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--out", help="markdown file whose bench_switches section is replaced (or appended)")
    args = parser.parse_args()

    names = [n.strip() for n in args.configs.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names or names[0] != "fp32":
        parser.error(f"--configs must start with fp32 and name only: {', '.join(CONFIGS)} (got {args.configs})")
    if args.devices == "auto":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(args.devices)]

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows, names_seen, losses = [], [], []
    for device in devices:
        print(f"benchmarking on {device} ({device_name(device)})", flush=True)
        device_rows, loss = bench_device(device, names, args)
        rows += device_rows
        losses.append(f"{loss:.3f}")
        names_seen.append(f"{device.type}: {device_name(device)}")
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu_note = ("" if any(d.type == "cuda" for d in devices) else
                "\nGPU rows: **not measured** (no CUDA device in this run); run the same command on a GPU machine.\n")
    md = "\n".join([
        BEGIN,
        "## Speed switches: precision, channels_last, torch.compile (`scripts/bench_switches.py`)",
        "",
        f"One training step of `{args.model}` at {args.size}³, batch {args.batch}: forward under autocast, loss "
        "`lncc_fast` + `grad` in float32, backward (fp16 with a GradScaler), Adam. Fastest and median of "
        f"{args.steps} steps per configuration, configurations interleaved step by step after {args.warmup} "
        "warm-up steps (the first step, with any compilation, is reported apart); the speed ratio is of the "
        "fastest steps, which other work on the machine disturbs least; CUDA synchronised. "
        f"On the CPU, {', '.join(sorted(SLOW_ON_CPU))} is timed on one step after one warm-up step (minutes per step). "
        "Accuracy at the same weights on the same pair: relative L2 difference of the predicted "
        f"field from fp32, and absolute difference of the loss (fp32 loss: {', '.join(losses)}).",
        "",
        f"Command: `python scripts/bench_switches.py --size {args.size} --batch {args.batch} --steps {args.steps}`  ",
        f"Device: {'; '.join(names_seen)} | torch {torch.__version__} | {datetime.date.today().isoformat()} | "
        f"load average {load_before:.1f} at the start, {load_after:.1f} at the end (other work on the machine)",
        "",
        "| device | switch | fastest step ms | median ms | speed vs fp32 | first step s | field rel. diff | loss diff | CUDA peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        gpu_note,
        END,
    ])
    print(md)
    if args.out:
        path = Path(args.out)
        text = path.read_text() if path.exists() else "# Benchmarks\n"
        if BEGIN in text and END in text:
            text = text[:text.index(BEGIN)] + md + text[text.index(END) + len(END):]
        else:
            text = text.rstrip("\n") + "\n\n" + md + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        print(f"updated {path}")


if __name__ == "__main__":
    main()
