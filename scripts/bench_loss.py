#!/usr/bin/env python
"""LNCC benchmark: forward + backward time and peak memory, side by side in one run
(``regkit.bench.loss``: lncc, lncc_group, lncc_fast and MONAI's LNCC; window 9, batch 1, a
brain-like synthetic pair at 80x96x112 and 160x192x224, on the CPU and on CUDA when present).

    .venv/bin/python scripts/bench_loss.py                          # print the markdown
    .venv/bin/python scripts/bench_loss.py --out docs/benchmarks.md # ... and update that section

How each figure is measured is in the docstring of ``regkit/bench/loss.py``. Peak memory and
the float64 equality check run in fresh processes of this script (``--child-*``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from regkit.bench import loss as bench
from regkit.bench.report import command_line, replace_section

ROOT = Path(__file__).resolve().parents[1]


def parse_size(text: str) -> Tuple[int, ...]:
    try:
        size = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 80x96x112, got {text!r}") from None
    if len(size) != 3 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"size must be three positive integers, got {text!r}")
    return size


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=parse_size, nargs="+", default=[(80, 96, 112), (160, 192, 224)])
    p.add_argument("--window", type=int, default=9)
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    p.add_argument("--methods", nargs="+", default=list(bench.METHODS), choices=bench.METHODS)
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
        print(json.dumps(bench.child_memory(args.child_memory, args.child_data, args.child_device, args.window,
                                            args.mem_limit_gb or 16.0, args.tf32)))
        return 0
    if args.child_equality:
        print(json.dumps(bench.child_equality(args.child_equality.split(","), args.child_data, args.child_device,
                                              args.window, args.mem_limit_gb or 16.0)))
        return 0

    devices = [torch.device(d) for d in args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])]
    if any(d.type == "cuda" for d in devices) and not torch.cuda.is_available():
        p.error("--devices cuda: CUDA is not available")
    md = bench.run(args.sizes, devices, args.methods, args.window, args.reps, args.budget_s,
                   args.mem_limit_gb or bench.default_mem_limit_gb(), args.equality_size, args.accuracy_size,
                   args.tf32, args.csv, args.cache, child=[sys.executable, str(Path(__file__).resolve())],
                   command=command_line("scripts/bench_loss.py", argv, drop=()))
    print(md)
    bench.log(f"CSV: {args.csv}")
    if args.out:
        replace_section(args.out, bench.SECTION, md)
        bench.log(f"updated {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
