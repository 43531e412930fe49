#!/usr/bin/env python3
"""Raw scans to a training set: align a folder of scans affinely to an atlas, write them (and their
label maps) on the atlas grid, and write the pairs CSV of ``dataset=pairs``.

    python scripts/prepare_dataset.py RAW_DIR --atlas atlas.nii.gz [--atlas-label atlas_seg.nii.gz] -o OUT

Same as the console command ``regkit-prepare``; see ``regkit/cli/prepare.py`` and
docs/registration.md.
"""
import sys

from regkit.cli.prepare import main

if __name__ == "__main__":
    sys.exit(main())
