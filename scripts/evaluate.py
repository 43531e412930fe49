#!/usr/bin/env python3
"""Run a checkpoint over a split and write a per-subject CSV and a summary table.

    python scripts/evaluate.py outputs/train/runs/<run>/checkpoints/best.ckpt --split test

Same as the console command ``regkit-evaluate``; see ``regkit/cli/evaluate.py``.
"""
import sys

from regkit.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
