#!/usr/bin/env python
"""Teacher vs distilled student vs student trained without distillation, on one dataset
(``regkit.bench.distill``): trains the three kinds of run with the project's own configs,
evaluates each best checkpoint on the test split and times CPU inference per pair. Writes
``comparison.csv`` and ``comparison.md`` under ``--out-dir`` and, with ``--doc``, the marked
section of that markdown file.

    .venv/bin/python scripts/distill_compare.py                        # embedded synthetic data
    .venv/bin/python scripts/distill_compare.py --doc docs/distillation.md
    .venv/bin/python scripts/distill_compare.py dataset=ixi dataset.root=/data/ixi --epochs 500 ...

Extra arguments are Hydra overrides passed to all runs (e.g. the dataset).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from regkit.bench import distill
from regkit.bench.report import command_line, replace_section
from regkit.cli import exit_on_user_error

ROOT = Path(__file__).resolve().parents[1]


@exit_on_user_error
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="lkunet", help="teacher model name (default lkunet)")
    p.add_argument("--epochs", type=int, default=40, help="teacher epochs")
    p.add_argument("--student-epochs", type=int, default=40, help="epochs of every student run")
    p.add_argument("--out-dir", type=Path, default=ROOT / "outputs" / "distill_compare")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs found in --out-dir")
    p.add_argument("--full-size", default="160,192,224", help="size for the second timing column ('' to skip)")
    p.add_argument("--reps", type=int, default=3, help="timed forwards per model and size")
    p.add_argument("--gammas", default="0.3",
                   help="comma-separated gamma values, one distilled student each (default 0.3, the paper's)")
    p.add_argument("--distill-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for the distilled runs only, e.g. trainer.flow_weight=1 (repeatable)")
    p.add_argument("--doc", type=Path, default=None, help="update the marked section of this markdown file")
    args, overrides = p.parse_known_args(argv)
    full = tuple(int(v) for v in args.full_size.split(",")) if args.full_size else None

    runs = distill.train_all(args.teacher, args.epochs, args.student_epochs,
                             [float(g) for g in args.gammas.split(",")], args.distill_set, overrides,
                             args.out_dir, args.reuse)
    rows = distill.evaluate_runs(runs, full, args.reps)
    command = command_line(".venv/bin/python scripts/distill_compare.py", argv, drop=())
    text = distill.markdown(rows, command, args.epochs, args.student_epochs, args.reps, full)
    distill.write_results(args.out_dir, rows, text)
    print(text)
    if args.doc:
        replace_section(args.doc, distill.SECTION, text)
        distill.log(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
