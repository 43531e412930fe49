#!/usr/bin/env python3
"""Convert the TransMorph IXI release (pickles) into regkit's NIfTI layout (``dataset=ixi``), then
check the result with the loader training uses (``regkit.data.ixi_release``).

    python scripts/convert_ixi_pkl.py /path/to/IXI_data /path/to/IXI_nifti

SECURITY: pickle files can run code when they are loaded. The converter unpickles with a
restricted unpickler that only rebuilds numpy arrays and plain tuples/lists, and refuses anything
else; still, convert only files from a source you trust. The pickles carry no header: the files
get a 1 mm identity affine, or with ``--affine-from REF.nii.gz`` the affine of a reference scan on
the same grid.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from regkit.data.io import load_volume
from regkit.data.ixi_release import IXI_SHAPE, check, convert
from regkit.errors import RegkitError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="the release's IXI_data folder (atlas.pkl, Train/, Val/, Test/)")
    parser.add_argument("out", help="output folder for the NIfTI layout")
    parser.add_argument("--affine-from", default=None, help="copy the affine of this NIfTI/MGH scan (same grid)")
    parser.add_argument("--any-shape", action="store_true", help=f"accept sizes other than {IXI_SHAPE}")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--check-only", action="store_true", help="only check an already converted folder")
    args = parser.parse_args(argv)
    shape = None if args.any_shape else IXI_SHAPE
    try:
        if not args.check_only:
            print("note: unpickling the release's files with a restricted unpickler (numpy arrays only); "
                  "pickles can carry code: convert only files from a source you trust", file=sys.stderr)
            affine = load_volume(args.affine_from).affine if args.affine_from else None
            manifest = convert(Path(args.src), Path(args.out), affine, shape, args.overwrite)
            print(f"converted {manifest['counts']} subjects + atlas; label values: {manifest['label_values']}")
        print(check(Path(args.out), shape))
    except RegkitError as exc:
        print(f"regkit: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
