#!/usr/bin/env python3
"""Evaluation-metric cost at full IXI size (160×192×224): Dice, Jacobian metrics and HD95, and
regkit's exact HD95 against a brute-force reference on small labels (``regkit.bench.metrics``).

    python scripts/bench_metrics.py                            # print the markdown section
    python scripts/bench_metrics.py --out docs/benchmarks.md   # replace/append its section there

Uses the real subjects 2 -> 1 of ../shared/data/real (or $REGKIT_REAL_DATA) with their 30 IXI
labels when present, else two synthetic subjects at 160×192×224 (20 labels). Default run: a few
minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from regkit.bench.metrics import SECTION, run
from regkit.bench.report import replace_section

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "REGKIT_REAL_DATA=../shared/data/real python scripts/bench_metrics.py --out docs/benchmarks.md"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="markdown file whose section to replace (appended if absent)")
    parser.add_argument("--real-data", type=Path,
                        default=Path(os.environ.get("REGKIT_REAL_DATA", ROOT.parent / "shared" / "data" / "real")),
                        help="the real-data folder (default: $REGKIT_REAL_DATA, else ../shared/data/real)")
    args = parser.parse_args(argv)
    text = run(args.real_data, COMMAND)
    print(text)
    if args.out:
        replace_section(args.out, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
