#!/usr/bin/env python3
"""Time the trainer's speed switches side by side on regkit's own training step: precision
(fp32 / bf16 / fp16 autocast), channels_last and torch.compile (``regkit.bench.switches``).

    .venv/bin/python scripts/bench_switches.py                           # CPU rows (and CUDA rows if present)
    .venv/bin/python scripts/bench_switches.py --out docs/scaling.md     # ... and rewrite its section there
    .venv/bin/python scripts/bench_switches.py --size 32 --steps 2 --configs fp32,bf16 loss=lncc

Every switch is a Trainer composed and built as ``train.py`` builds it (``trainer.precision=...
trainer.channels_last=... trainer.compile=...``), trained with ``Trainer.fit`` one step at a time;
extra arguments are Hydra overrides for every configuration. The default run (vxm1 at 64³, the
seven switches, 10 timed steps) takes an estimated 5 to 7 minutes on a quiet 2-core CPU, most of
it fp16's two steps and the first (compiling) step of the two torch.compile switches.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from regkit.bench.machine import load_average
from regkit.bench.report import command_line, replace_section
from regkit.bench.switches import SECTION, SWITCHES, check_names, markdown, run_switches
from regkit.cli import exit_on_user_error

ROOT = Path(__file__).resolve().parents[1]


@exit_on_user_error
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vxm1")
    parser.add_argument("--size", type=int, nargs="+", default=[64], help="volume size: one (cubic) or three values")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--devices", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: the CPU, and CUDA if present")
    parser.add_argument("--configs", default=",".join(SWITCHES),
                        help="comma-separated, fp32 first; any of: " + ", ".join(SWITCHES))
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "generated",
                        help="where the synthetic pair is generated (cached)")
    parser.add_argument("--out", type=Path, help="markdown file whose bench_switches section is rewritten (appended)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every configuration, e.g. loss=lncc")
    args = parser.parse_args(argv)
    if len(args.size) not in (1, 3):
        parser.error(f"--size takes one or three values, got {len(args.size)}")
    size = args.size * 3 if len(args.size) == 1 else args.size
    names = check_names([n.strip() for n in args.configs.split(",")])
    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.devices]

    runs = []
    for device in devices:
        print(f"benchmarking on {device}", flush=True)
        runs.append(run_switches(device, names, model=args.model, size=size,
                                 batch=args.batch, steps=args.steps, warmup=args.warmup, overrides=args.overrides,
                                 data_dir=args.data_dir))
    command = command_line("python scripts/bench_switches.py", argv, drop=("--out", "--data-dir"))
    text = markdown(runs, model=args.model, size=size, batch=args.batch, steps=args.steps, warmup=args.warmup,
                    command=command, load_after=load_average())
    print(text)
    if args.out:
        replace_section(args.out, SECTION, text)
        print(f"updated {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
