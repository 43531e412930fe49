"""``regkit-prepare``: raw scans to a training set (affine alignment to an atlas, the pairs CSV).

Only parses the command line; :func:`regkit.registration.prepare.prepare_dataset` does the work.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from hydra.utils import instantiate
from omegaconf import OmegaConf

from regkit.cli import exit_on_user_error
from regkit.errors import InputError, MissingFileError
from regkit.registration.affine import AffineRegistration
from regkit.registration.prepare import LABEL_SUFFIXES, PAIRINGS, prepare_dataset


def _registration_from_args(args) -> AffineRegistration:
    """The affine stage: a preset YAML (``--config``, with ``_target_``) or the class defaults,
    then the command-line choices on top."""
    overrides = {k: v for k, v in (("transform", args.transform), ("loss", args.loss), ("init", args.init))
                 if v is not None}
    if args.config:
        cfg_path = Path(args.config)
        if not cfg_path.exists():
            raise MissingFileError(f"{cfg_path}: no such preset file")
        reg = instantiate(OmegaConf.load(cfg_path), **overrides, device=args.device, progress=False)
        if not isinstance(reg, AffineRegistration):
            raise InputError(f"{cfg_path}: _target_ must be regkit.registration.affine.AffineRegistration, "
                             f"got {type(reg).__name__}")
        return reg
    return AffineRegistration(**overrides, device=args.device, progress=False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="regkit-prepare",
        description="Align a folder of raw scans (any grid and orientation; .nii/.nii.gz/.mgz) affinely to an atlas, "
                    "write them and their label maps on the atlas grid, and write the pairs CSV of dataset=pairs.",
        epilog="Label maps: SCAN<suffix>.<ext> belongs to SCAN.<ext> (suffixes --label-suffix), or give a CSV with "
               "columns image[,label][,name]. Outputs: images/, labels/, transforms/ (world .txt and ITK .tfm), "
               "atlas.nii.gz, pairs.csv, prepare.json. Scans already done are kept unless --overwrite.")
    parser.add_argument("raw", nargs="?", default=None, help="folder of raw scans (or use --subjects)")
    parser.add_argument("--atlas", required=True, help="the atlas or template scan (its grid is the output grid)")
    parser.add_argument("--atlas-label", default=None, help="the atlas's label map (for atlas pairs with labels)")
    parser.add_argument("-o", "--out", required=True, help="output folder")
    parser.add_argument("--subjects", default=None, help="CSV with columns image[,label][,name] instead of a folder")
    parser.add_argument("--label-suffix", default=",".join(LABEL_SUFFIXES),
                        help=f"comma-separated label-map name suffixes (default {','.join(LABEL_SUFFIXES)})")
    parser.add_argument("--pairs", default="atlas-to-subject", choices=PAIRINGS,
                        help="pairing of the CSV (default atlas-to-subject: moving = atlas, fixed = scan)")
    parser.add_argument("--config", default=None,
                        help="affine preset YAML (e.g. configs/registration/affine.yaml); default: its defaults")
    parser.add_argument("--transform", default=None, help="rigid, similarity or affine (default: the preset's)")
    parser.add_argument("--loss", default=None, help="image loss by name: ncc (same contrast), mi (other contrasts)")
    parser.add_argument("--init", default=None, help="none, com or moments (default: the preset's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overwrite", action="store_true", help="redo scans whose outputs exist")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    @exit_on_user_error
    def run():
        summary = prepare_dataset(args.out, args.atlas, args.raw, args.subjects, args.atlas_label, args.pairs,
                                  _registration_from_args(args), args.overwrite,
                                  [s.strip() for s in args.label_suffix.split(",") if s.strip()], not args.no_progress)
        status = [r["status"] for r in summary["subjects"].values()]
        print(f"{status.count('done')} aligned, {status.count('kept')} kept from before, {status.count('skipped')} "
              f"skipped; {summary['n_pairs']} pairs")
        if summary["pairs_csv"]:
            print(f"pairs:   {summary['pairs_csv']}   (train with dataset=pairs dataset.train={summary['pairs_csv']})")
        print(f"summary: {Path(args.out) / 'prepare.json'}")

    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
