"""``regkit-learn2reg``: Learn2Reg submissions from the command line (docs/learn2reg.md).

    regkit-learn2reg submit CKPT OASIS/OASIS_dataset.json submission/    # a checkpoint's displacement files
    regkit-learn2reg zero   OASIS/OASIS_dataset.json submission/         # the identity baseline
    regkit-learn2reg score  OASIS/OASIS_dataset.json submission/ --labels 1-35
    regkit-learn2reg rank   a/eval/metrics.json b/eval/metrics.json --out ranking.md

Only parses the command line; :mod:`regkit.learn2reg` does the work.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from regkit.cli import exit_on_user_error
from regkit.data.io import atomic_write
from regkit.errors import InputError, MissingFileError
from regkit.learn2reg import (FORMATS, NAMINGS, SPLITS, parse_labels, rank_methods, score_submission, summary_markdown,
                              write_report, write_submission, zero_predictor)
from regkit.predictor import Predictor


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regkit-learn2reg", description="Learn2Reg submissions: write, score, "
                                     "rank (docs/learn2reg.md).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit", help="write a checkpoint's displacement files for a split")
    p.add_argument("checkpoint", help="a regkit checkpoint (best.ckpt, last.ckpt)")
    p.add_argument("json", help="the task's dataset JSON (e.g. OASIS/OASIS_dataset.json)")
    p.add_argument("out", help="submission folder")
    p.add_argument("--split", default="val", choices=tuple(SPLITS))
    p.add_argument("--format", default="nifti", choices=FORMATS)
    p.add_argument("--naming", default="auto", choices=NAMINGS)
    p.add_argument("--device", default="auto")
    p = sub.add_parser("zero", help="write a zero-displacement (identity) submission for a split")
    p.add_argument("json", help="the task's dataset JSON (e.g. OASIS/OASIS_dataset.json)")
    p.add_argument("out", help="submission folder")
    p.add_argument("--split", default="val", choices=tuple(SPLITS))
    p.add_argument("--format", default="nifti", choices=FORMATS)
    p.add_argument("--naming", default="auto", choices=NAMINGS)
    p = sub.add_parser("score", help="score a submission folder as the challenge does")
    p.add_argument("json")
    p.add_argument("submission", help="folder of disp_*.nii.gz / .npz files")
    p.add_argument("--split", default="val", choices=tuple(SPLITS))
    p.add_argument("--labels", default=None, help="DSC/HD95 labels, e.g. 1-35 (default: those in each fixed map)")
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 (seconds per pair)")
    p.add_argument("--masked", action="store_true", help="SDlogJ inside the fixed masks (lung tasks)")
    p.add_argument("--out", default=None, help="report folder (default: <submission>/eval)")
    p = sub.add_parser("rank", help="rank scored methods (their metrics.json) by the challenge's columns")
    p.add_argument("metrics", nargs="+", help="metrics.json files written by 'score'")
    p.add_argument("--names", nargs="+", default=None, help="method names (default: the submission folder names)")
    p.add_argument("--out", default=None, help="write the markdown table here")
    return parser


def checkpoint_predict(checkpoint, device="auto"):
    """``predict(moving, fixed) -> flow`` of a checkpoint for :func:`~regkit.learn2reg.write_submission`:
    raw intensities in, normalised as in training, the field at the fixed image's full size out."""
    predictor = Predictor.from_checkpoint(checkpoint, device=device)

    def predict(moving, fixed):
        dev = predictor.device
        out = predictor(predictor.prepare(moving).to(dev), predictor.prepare(fixed).to(dev))
        return out.flow.float().cpu()

    return predict


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    @exit_on_user_error
    def run():
        if args.command in ("submit", "zero"):
            predict = checkpoint_predict(args.checkpoint, args.device) if args.command == "submit" else zero_predictor
            written = write_submission(args.json, predict, args.out, args.split, args.format, args.naming)
            print(f"wrote {len(written)} displacement files to {args.out}")
        elif args.command == "score":
            result = score_submission(args.json, args.submission, args.split, parse_labels(args.labels),
                                      not args.no_hd95, args.masked)
            paths = write_report(result, args.out or Path(args.submission) / "eval")
            print(summary_markdown(result))
            print(f"per-pair CSV: {paths['csv']}\nsummary:      {paths['markdown']}\nmetrics:      {paths['json']}")
        else:
            names = args.names or [Path(m).resolve().parent.parent.name for m in args.metrics]
            if len(names) != len(args.metrics):
                raise InputError(f"--names: {len(names)} names for {len(args.metrics)} metrics files")
            results = {}
            for name, m in zip(names, args.metrics):
                path = Path(m)
                if not path.is_file():
                    raise MissingFileError(f"{path}: metrics file not found")
                try:
                    results[name] = json.loads(path.read_text())["aggregates"]
                except (ValueError, KeyError, TypeError):
                    raise InputError(f"{path}: not a metrics.json written by 'learn2reg score'") from None
            _, markdown = rank_methods(results)
            if args.out:
                atomic_write(args.out, lambda t: Path(t).write_text(markdown))
            print(markdown)

    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
