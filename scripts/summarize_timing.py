#!/usr/bin/env python
"""Turn a folder of training runs (a sweep, or single runs) into the epoch-time table
(``regkit.bench.epoch_time.summarize``); nothing is re-run.

    python scripts/summarize_timing.py outputs/epoch_time/multiruns/<date>_<time>
    python scripts/summarize_timing.py RUN_DIR [RUN_DIR ...] --out docs/epoch_time.md --png fig.png

Every run folder with ``.hydra/`` (the composed config) and ``tensorboard/`` (the per-epoch timing
that every regkit training run logs) is read: one row per model with seconds per epoch for
``lncc``, ``lncc_group`` and ``lncc_fast`` and the reductions, a breakdown per timing phase, a CSV
and optionally a PNG bar chart (needs matplotlib).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from regkit.bench.epoch_time import summarize
from regkit.errors import RegkitError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders or folders containing them (e.g. a sweep)")
    parser.add_argument("--out", type=Path, help="write the markdown here")
    parser.add_argument("--csv", type=Path, help="write a CSV here")
    parser.add_argument("--png", type=Path, help="write a bar chart here (needs matplotlib)")
    parser.add_argument("--title", default="Training time per epoch")
    args = parser.parse_args(argv)
    try:
        text = summarize(args.runs, args.out, args.csv, args.png, args.title)
    except RegkitError as exc:
        print(f"summarize_timing: error: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
