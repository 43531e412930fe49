"""``regkit-pretrained``: list the checkpoints shipped with regkit, export a training run's
checkpoint as one, or check that a run reproduces one bit for bit (:mod:`regkit.pretrained`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from regkit.cli import exit_on_user_error
from regkit.errors import InputError
from regkit.pretrained import PRETRAINED, WEIGHTS_DIR, export, list_pretrained, pretrained_path, same_weights, sha256


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="regkit-pretrained", description="Shipped checkpoints.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="names, models and what they measured")
    e = sub.add_parser("export", help="write a training run's checkpoint as the shipped file of NAME")
    e.add_argument("checkpoint")
    e.add_argument("name")
    e.add_argument("--command", default=None, help="the training command (default: NAME's recorded one)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default=None, help="output file (default: regkit/weights/<NAME>.ckpt)")
    c = sub.add_parser("compare", help="do a run's weights equal the shipped NAME's, bit for bit?")
    c.add_argument("checkpoint")
    c.add_argument("name")
    args = p.parse_args(argv)
    if args.cmd == "list":
        for name in list_pretrained():
            info = PRETRAINED[name]
            print(f"{name}: {info.description} ({info.model}, {info.parameters:,} weights, {info.figures})")
    elif args.cmd == "export":
        known = PRETRAINED.get(args.name)
        command = args.command or (known.command if known else None)
        if not command:
            raise InputError(f"'{args.name}' is not a known shipped model: give --command")
        out = Path(args.out) if args.out else WEIGHTS_DIR / f"{args.name}.ckpt"
        path = export(args.checkpoint, out, args.name, command, args.seed)
        print(f"{path}  sha256 {sha256(path)}")
    else:
        same = same_weights(args.checkpoint, pretrained_path(args.name))
        print(f"{args.checkpoint}: {'the same weights as' if same else 'NOT the same weights as'} {args.name}")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
