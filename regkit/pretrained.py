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
    regkit-pretrained compare outputs/synth_brain/checkpoints/last.ckpt synth-brain   # same weights?
    regkit-pretrained export outputs/synth_brain/checkpoints/last.ckpt synth-brain     # write the file
"""
from __future__ import annotations

import datetime
import hashlib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from regkit.checkpoint import load_checkpoint, save_checkpoint
from regkit.data.io import PathLike
from regkit.errors import MissingFileError, check_choice

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


PRETRAINED: Dict[str, PretrainedInfo] = {
    "synth-brain": PretrainedInfo(
        file="synth-brain.ckpt",
        sha256="385b6823f75a048e91e5e94bbe4a18ce37ab4499424705d93db1249ea34b413b",
        model="vxm1", parameters=274_387, shape=(40, 48, 56), normalize="percentile",
        command="python train.py experiment=synth_brain", seed=0,
        commit="1434b4723f6591153109c331d08973c634e8c019",
        description="VoxelMorph-1 at 40x48x56 (4 mm) for T1 brain MRI, trained on synthesised images only",
        figures={"steps": 800, "train_minutes": 20.2, "dice_subj2_to_subj1": 0.631, "affine_dice": 0.611,
                 "nonpos_jac_pct": 0.0},
    ),
}


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
