"""Checkpoints shipped inside the package, reachable by name: ``regkit-register --model synth-brain``.

A shipped checkpoint is a regkit checkpoint (plain data, loaded with ``weights_only=True``) stripped
of its optimizer and resume state, with a ``pretrained`` record saying where it came from. What it
is, how it was trained and what it measured are also written here, in :data:`PRETRAINED`, so that
``tests/test_pretrained.py`` can check the file against them (its SHA-256, model, parameter count,
training spec and record).

    >>> from regkit.pretrained import list_pretrained, pretrained_path
    >>> list_pretrained()
    ['synth-brain']
    >>> Predictor.from_checkpoint(pretrained_path("synth-brain"))

To retrain and re-export a shipped model (``docs/generalisation.md``)::

    python train.py experiment=synth_brain hydra.run.dir=outputs/synth_brain
    python -m regkit.pretrained compare outputs/synth_brain/checkpoints/last.ckpt synth-brain   # same weights?
    python -m regkit.pretrained export outputs/synth_brain/checkpoints/last.ckpt synth-brain     # write the file
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from regkit.checkpoint import load_checkpoint, save_checkpoint
from regkit.cli import exit_on_user_error
from regkit.data.io import PathLike
from regkit.errors import InputError, MissingFileError, check_choice

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
KEPT = ("model", "state_dict", "epoch", "global_step", "metrics", "config", "data")  # what a shipped file keeps


@dataclass(frozen=True)
class PretrainedInfo:
    """What a shipped checkpoint is and how it was made.

    Attributes:
        file: file name under ``regkit/weights/``.
        sha256: of that file.
        model, parameters: the registry name and the number of weights.
        shape, normalize: the training grid size and the intensity normalisation applied to new scans.
        command: the command that trained it (from the project folder); ``seed`` its seed.
        commit: the git commit of the code that trained it.
        description: one line for ``list``.
        figures: what it measured (``docs/generalisation.md`` has the conditions).
    """

    file: str
    sha256: str
    model: str
    parameters: int
    shape: Sequence[int]
    normalize: str
    command: str
    seed: int
    commit: str
    description: str
    figures: Dict[str, Any] = field(default_factory=dict)


PRETRAINED: Dict[str, PretrainedInfo] = {}


def list_pretrained() -> List[str]:
    """Names of the shipped checkpoints."""
    return sorted(PRETRAINED)


def pretrained_info(name: str) -> PretrainedInfo:
    check_choice("pretrained model", name, list_pretrained())
    return PRETRAINED[name]


def pretrained_path(name: str) -> Path:
    """The installed file of the shipped checkpoint ``name`` (errors name the valid ones)."""
    path = WEIGHTS_DIR / pretrained_info(name).file
    if not path.is_file():
        raise MissingFileError(f"{path}: the shipped checkpoint '{name}' is missing from this installation "
                               f"(reinstall regkit; the file is package data)")
    return path


def sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit(folder: PathLike = Path(__file__).resolve().parents[1]) -> str:
    """``git rev-parse HEAD`` of ``folder`` (``unknown`` outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def export(checkpoint: PathLike, out: PathLike, name: str, command: str, seed: int,
           commit: Optional[str] = None) -> Path:
    """Write ``checkpoint`` (a training run's) as a shipped checkpoint: only :data:`KEPT` entries
    and a ``pretrained`` record (name, command, seed, commit, torch, steps, date)."""
    data = load_checkpoint(checkpoint)
    payload = {k: data[k] for k in KEPT if k in data}
    payload["pretrained"] = {"name": name, "command": command, "seed": int(seed), "commit": commit or git_commit(),
                             "torch": str(torch.__version__), "steps": int(data.get("global_step", 0)),
                             "exported": datetime.date.today().isoformat(), "source": Path(checkpoint).name}
    return save_checkpoint(out, payload)


def same_weights(a: PathLike, b: PathLike) -> bool:
    """Whether two checkpoints hold the same model and bitwise the same weights."""
    da, db = load_checkpoint(a), load_checkpoint(b)
    if da["model"] != db["model"] or da["state_dict"].keys() != db["state_dict"].keys():
        return False
    return all(torch.equal(da["state_dict"][k], db["state_dict"][k]) for k in da["state_dict"])


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m regkit.pretrained", description="Shipped checkpoints.")
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
