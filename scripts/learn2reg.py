#!/usr/bin/env python3
"""Learn2Reg submissions from the command line (docs/learn2reg.md):

    python scripts/learn2reg.py zero  OASIS/OASIS_dataset.json submission/          # identity baseline
    python scripts/learn2reg.py score OASIS/OASIS_dataset.json submission/ --labels 1-35
    python scripts/learn2reg.py rank  a/eval/metrics.json b/eval/metrics.json --out ranking.md

Same as the console command ``regkit-learn2reg`` (``regkit/cli/learn2reg.py``).
"""
import sys

from regkit.cli.learn2reg import main

if __name__ == "__main__":
    sys.exit(main())
