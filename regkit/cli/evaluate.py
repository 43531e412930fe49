"""``regkit-evaluate``: run a checkpoint over a split and write ``per_subject.csv`` and ``summary.md``.

Only parses the command line; :func:`regkit.evaluation.evaluate` does the work.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from regkit.cli import exit_on_user_error
from regkit.evaluation import evaluate
from regkit.metrics import LABEL_MODES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regkit-evaluate",
                                description="Run a checkpoint over a split; write per_subject.csv and summary.md.")
    p.add_argument("checkpoint", help="a regkit checkpoint (best.ckpt, last.ckpt)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", default=None, help="output folder (default: <run>/eval_<split>)")
    p.add_argument("--pairs", default=None, help="evaluate the pairs of this CSV instead of the training dataset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the checkpoint's config, e.g. --set dataset.root=/data/ixi (repeatable)")
    p.add_argument("--label-mode", default="nearest", choices=LABEL_MODES,
                   help="label warping: nearest (default) or linear (one-hot)")
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 (seconds per pair at full size on a CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many pairs")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    @exit_on_user_error
    def run():
        result = evaluate(args.checkpoint, args.split, args.out, args.overrides, args.pairs, args.label_mode,
                          not args.no_hd95, args.device, args.limit)
        print(result["text"])
        print(f"per-subject CSV: {result['csv']}\nsummary:         {result['markdown']}")

    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
