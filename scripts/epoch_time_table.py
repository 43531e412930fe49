#!/usr/bin/env python
"""Reproduce the FastLNCC preprint's epoch-time table with lncc, lncc_group and lncc_fast.

One command runs the grid models x {lncc, lncc_group, lncc_fast} as a Hydra multirun of
``train.py experiment=epoch_time`` (every job trains with regkit's Trainer and logs its
per-epoch timing to TensorBoard), then summarises the sweep folder into a markdown table (the
preprint's layout, with reductions), a CSV and a PNG bar chart (the preprint's Figure 1 style),
all written into the sweep folder (``regkit.bench.epoch_time``).

    python scripts/epoch_time_table.py                  # GPU protocol: 403 pairs, 160x192x224, 5 epochs
    python scripts/epoch_time_table.py --preset cpu     # 2-core CPU: 80x96x112, 8 pairs, 3 epochs, VM-1/VM-2
    python scripts/epoch_time_table.py --models vxm1 --epochs 2 --pairs 20 --out docs/epoch_time_cpu.md
    python scripts/epoch_time_table.py --preset cpu --out docs/benchmarks.md --png docs/figures/epoch_time_cpu.png

``--out`` rewrites the ``epoch_time`` section of a markdown file (appended if absent), with the
device it ran on; ``--png`` copies the chart there too.

Jobs run one after another in one process (Hydra's basic launcher), so the methods are timed
side by side on the same machine; the first epoch of each job is left out of the means.
"""
from __future__ import annotations

import argparse
import datetime
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from regkit.bench.epoch_time import PRESETS, SECTION, summarize, sweep_command
from regkit.bench.machine import describe_machine
from regkit.bench.report import replace_section
from regkit.data.io import atomic_write
from regkit.errors import RegkitError

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--models", help="comma-separated model names (default: the preset's)")
    parser.add_argument("--losses", default="lncc,lncc_group,lncc_fast")
    parser.add_argument("--shape", help="volume size, e.g. 160,192,224")
    parser.add_argument("--pairs", type=int, help="training pairs per epoch")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--sweep-dir", type=Path, help="default: outputs/epoch_time/multiruns/<date>_<time>")
    parser.add_argument("--out", type=Path, help="markdown file whose epoch_time section is rewritten (appended)")
    parser.add_argument("--png", type=Path, help="also write the bar chart here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides passed to every job")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    shape, pairs = args.shape or preset["shape"], args.pairs or preset["pairs"]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    sweep = (args.sweep_dir or ROOT / "outputs" / "epoch_time" / "multiruns" / stamp).resolve()
    overrides = [*preset["extra"], *args.overrides]
    cmd = sweep_command(ROOT / "train.py", sweep, args.models or preset["models"], args.losses, shape, pairs,
                        args.epochs or preset["epochs"], overrides)
    on_cpu = "trainer.device=cpu" in overrides or not torch.cuda.is_available()
    machine = describe_machine("cpu" if on_cpu else "cuda")
    print("running:", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        print(f"epoch_time_table: error: the sweep failed (exit {result.returncode}); partial results are in {sweep}",
              file=sys.stderr)
        return result.returncode
    title = f"Training time per epoch ({pairs} pairs, {shape.replace(',', '×')}, batch 1, window 9)"
    try:
        text = summarize([sweep], sweep / "epoch_time.md", sweep / "epoch_time.csv", sweep / "epoch_time.png", title)
    except RegkitError as exc:
        print(f"epoch_time_table: error: {exc}", file=sys.stderr)
        return 2
    print(text)
    if args.out:
        replace_section(args.out, SECTION, f"Device: {machine.line()}\n\n{text}\n")
    if args.png:
        atomic_write(args.png, lambda tmp: shutil.copyfile(sweep / "epoch_time.png", tmp))
    print(f"\ntable: {sweep / 'epoch_time.md'}\nchart: {sweep / 'epoch_time.png'}\ncsv:   {sweep / 'epoch_time.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
