#!/usr/bin/env python
"""Networks on scans they never saw (``regkit.bench.generalise``): trains each recipe with the
project's own command (``train.py experiment=...``), registers the held-out real pair (subject 2
-> subject 1) with its last checkpoint at full size, and tabulates the training time, Dice over the
30 IXI structures and % det J <= 0 next to affine alignment (0.611), with the development pair
(OASIS B -> A white matter) the recipes were chosen on. Writes ``comparison.json`` and
``comparison.md`` under ``--out-dir`` and, with ``--doc``, the marked section of that file.

    .venv/bin/python scripts/generalise_compare.py                                    # every recipe
    .venv/bin/python scripts/generalise_compare.py --recipes real_generalise synth_brain --doc docs/generalisation.md
    .venv/bin/python scripts/generalise_compare.py --run synth_brain=outputs/synth_brain   # score a finished run

Extra arguments are Hydra overrides passed to every training run.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from regkit.bench import generalise
from regkit.bench.report import command_line, replace_section
from regkit.cli import exit_on_user_error
from regkit.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@exit_on_user_error
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", default=generalise.DEFAULT_RECIPES, choices=list(generalise.RECIPES))
    p.add_argument("--run", action="append", default=[], metavar="RECIPE=RUN_DIR",
                   help="score this finished run folder for RECIPE instead of training it (repeatable)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "outputs" / "generalise_compare")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs found in --out-dir")
    p.add_argument("--real-root", type=Path,
                   default=Path(os.environ.get("REGKIT_REAL_DATA", ROOT.parent / "shared" / "data" / "real")))
    p.add_argument("--device", default="cpu", help="device of the evaluation (training follows the configs)")
    p.add_argument("--doc", type=Path, default=None, help="update the marked section of this markdown file")
    args, overrides = p.parse_known_args(argv)
    given = {}
    for item in args.run:
        key, _, folder = item.partition("=")
        if key not in generalise.RECIPES or not folder:
            raise InputError(f"--run expects RECIPE=RUN_DIR with RECIPE one of {', '.join(generalise.RECIPES)}, got {item!r}")
        given[key] = Path(folder)
    generalise.held_out_paths(args.real_root)  # missing data fails now, before any training
    # with --run and no --recipes: just the given runs; else the recipes asked for (given runs scored as they are)
    keys = list(given) if given and "--recipes" not in argv else args.recipes
    rows = []
    for key in keys:
        run_dir = given.get(key) or generalise.train_recipe(key, args.out_dir, overrides, args.reuse)
        rows.append(generalise.evaluate_run(key, run_dir, args.real_root, args.device))
    command = command_line(".venv/bin/python scripts/generalise_compare.py", argv, drop=("--doc", "--out-dir"))
    text = generalise.markdown(rows, command, args.device)
    generalise.write_results(args.out_dir, rows, text)
    print(text)
    if args.doc:
        replace_section(args.doc, generalise.SECTION, text)
        generalise.log(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
