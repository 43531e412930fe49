#!/usr/bin/env python3
"""Register a moving scan to a fixed scan with a trained checkpoint (NIfTI in, NIfTI out).

    python scripts/register.py CKPT moving.nii.gz fixed.nii.gz -o out/ [--moving-label L] [--fixed-label L]

Same as the console command ``regkit-register``; see ``regkit/cli/register.py`` and the README.
"""
import sys

from regkit.cli.register import main

if __name__ == "__main__":
    sys.exit(main())
