"""Networks on scans they never saw: the held-out pair of ``../shared/data/real`` scored for
every generalisation recipe, next to affine alignment (``scripts/generalise_compare.py``).

The held-out pair is subject 2 -> subject 1 on the common 160×192×224 grid (both already
affinely aligned; the "before" of every row is that affine alignment). Each recipe is trained
with the project's own command (``train.py experiment=<recipe>``), then its checkpoint registers
the pair at full size through :class:`~regkit.predictor.Predictor` (the network sees the pair at
its training size; the field is resampled back), exactly as ``regkit-register`` does, and the
row reports Dice over the 30 IXI structures (nearest label warping), % det J <= 0 and the
training time. Nothing of subject 2 and no label map of subject 1 or 2 enters any recipe's
training or its model selection (the recipes' configs say how).
"""
from __future__ import annotations

import datetime
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from regkit.bench.config import compose
from regkit.bench.machine import device_name, load_average
from regkit.bench.report import markdown_table, write_text
from regkit.checkpoint import load_checkpoint
from regkit.errors import InputError, MissingFileError
from regkit.experiment import train
from regkit.inference import load_inputs, registration_outputs
from regkit.metrics import IXI_LABELS
from regkit.predictor import Predictor

SECTION = "generalise_compare"
GRID = "common_160x192x224"
HELD_OUT = {  # subject 2 -> subject 1: the pair no recipe may see
    "moving": f"{GRID}/subj2_niivueN_norm.nii.gz", "fixed": f"{GRID}/subj1_vxm_norm.nii.gz",
    "moving_label": f"{GRID}/subj2_niivueN_aseg.nii.gz", "fixed_label": f"{GRID}/subj1_vxm_aseg.nii.gz",
}
AFFINE_DICE = 0.611  # ../shared/data/real/README.md: affine alignment only, 30 IXI structures


def log(msg: str) -> None:
    print(f"[generalise_compare] {msg}", flush=True)


@dataclass
class Recipe:
    """One row of the comparison: a name, the ``train.py`` overrides that train it (in order,
    stages that start from the previous stage's weights), and what it may see."""

    name: str
    stages: List[List[str]]
    sees: str

    def commands(self) -> List[str]:
        return ["python train.py " + " ".join(s) for s in self.stages]


# The recipes of docs/generalisation.md. A stage's '{prev}' is the previous stage's last.ckpt.
RECIPES: Dict[str, Recipe] = {
    "real_small": Recipe("real_small (the old example, no augmentation)", [["experiment=real_heldout", "augment=none"]],
                         "images of subjects 1, 3, 4, 5"),
    "real_generalise": Recipe("real_generalise (augmentation)", [["experiment=real_generalise"]],
                              "images of subjects 1, 3, 4, 5"),
    "synth_brain": Recipe("synth_brain (data-free: synthesis only)", [["experiment=synth_brain"]],
                          "label maps: synthetic template, random shapes, OASIS pair (no image)"),
}


@dataclass
class Row:
    recipe: str
    sees: str
    checkpoint: str
    train_seconds: Optional[float]
    dice: float
    dice_before: float
    nonpos_jac_pct: float
    sdlogj: float
    steps: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def held_out_paths(real_root) -> Dict[str, Path]:
    """The four files of the held-out pair under the real-data folder (missing ones named)."""
    root = Path(real_root).expanduser()
    paths = {k: root / v for k, v in HELD_OUT.items()}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise MissingFileError(f"held-out pair not found: {', '.join(missing)} (the real-data folder, "
                               f"../shared/data/real or $REGKIT_REAL_DATA)")
    return paths


@torch.no_grad()
def score_checkpoint(checkpoint, real_root, device: str = "cpu") -> Dict[str, Any]:
    """Register subject 2 -> subject 1 at full size with ``checkpoint`` (as ``regkit-register``
    does, nothing written) and return its record: ``dice`` and ``dice_before`` over the 30 IXI
    structures (nearest label warping), ``nonpos_jac_pct``, ``sdlogj``, ``seconds_network``."""
    paths = held_out_paths(real_root)
    predictor = Predictor.from_checkpoint(checkpoint, device=device)
    mov, fix, mlab, flab = load_inputs(paths["moving"], paths["fixed"], paths["moving_label"], paths["fixed_label"])
    if not np.allclose(mov.affine, fix.affine, atol=1e-3):
        raise InputError(f"{paths['moving']} and {paths['fixed']} are not on one grid")
    m = torch.from_numpy(predictor.normalize(mov.data))[None, None].to(predictor.device)
    f = torch.from_numpy(predictor.normalize(fix.data))[None, None].to(predictor.device)
    start = time.perf_counter()
    flow = predictor(m, f).flow
    record: Dict[str, Any] = {"seconds_network": time.perf_counter() - start, "notes": list(predictor.notes)}
    registration_outputs(fix, mov, flow, np.eye(4), record, mlab, flab, "nearest", list(IXI_LABELS))
    return record


def training_record(checkpoint) -> Dict[str, Any]:
    """Steps, epochs and the training wall time a run's checkpoint holds (``time/train_total``
    when logged, else the sum of its epochs' ``time/epoch`` is not available: ``None``)."""
    data = load_checkpoint(checkpoint)
    metrics = data.get("metrics") or {}
    return {"steps": int(data.get("global_step", 0)), "epochs": int(data.get("epoch", 0)),
            "model": (data.get("model") or {}).get("name"), "metrics": metrics}


def train_recipe(key: str, recipe: Recipe, out_dir: Path, overrides: Sequence[str], reuse: bool) -> Dict[str, Any]:
    """Train every stage of ``recipe`` (or reuse finished ones) into ``out_dir/key/stageN``;
    returns the final checkpoint and the summed training wall time (s)."""
    prev, seconds = None, 0.0
    for n, stage in enumerate(recipe.stages):
        run_dir = out_dir / key / f"stage{n}"
        last = run_dir / "checkpoints" / "last.ckpt"
        timing = run_dir / "train_seconds.json"
        args = [a.replace("{prev}", str(prev)) for a in stage] + list(overrides)
        if reuse and last.exists() and timing.exists():
            log(f"{key} stage {n}: reusing {last}")
            seconds += float(json.loads(timing.read_text())["seconds"])
        else:
            log(f"{key} stage {n}: python train.py {' '.join(args)}")
            start = time.perf_counter()
            train(compose(args + [f"paths.output_dir={run_dir}", f"task_name={key}"]))
            elapsed = time.perf_counter() - start
            write_text(timing, json.dumps({"seconds": elapsed, "load_average": load_average(), "args": args}) + "\n")
            seconds += elapsed
            log(f"{key} stage {n}: trained in {elapsed:.0f} s (load average {load_average():.1f})")
        prev = last
    return {"checkpoint": prev, "seconds": seconds}


def evaluate_recipes(trained: Dict[str, Dict[str, Any]], real_root, device: str = "cpu") -> List[Row]:
    rows = []
    for key, run in trained.items():
        recipe = RECIPES.get(key)
        rec = score_checkpoint(run["checkpoint"], real_root, device)
        info = training_record(run["checkpoint"])
        rows.append(Row(recipe.name if recipe else key, recipe.sees if recipe else "", str(run["checkpoint"]),
                        run.get("seconds"), rec["dice"], rec["dice_before"], rec["nonpos_jac_pct"], rec["sdlogj"],
                        info["steps"]))
        log(f"{key}: Dice {rec['dice']:.4f} (affine {rec['dice_before']:.4f}), % det J <= 0 {rec['nonpos_jac_pct']:.4f}")
    return rows


def markdown(rows: Sequence[Row], command: str, device: str = "cpu") -> str:
    """The comparison table with its conditions (machine, load, date, command)."""
    table = [["affine alignment only (the scans' common grid)", "–", "–", "–", f"{AFFINE_DICE:.3f}", "–"]]
    for r in rows:
        t = "–" if r.train_seconds is None else f"{r.train_seconds / 60:.1f} min"
        table.append([r.recipe, r.sees, str(r.steps or "–"), t, f"**{r.dice:.3f}**" if r.dice > AFFINE_DICE
                      else f"{r.dice:.3f}", f"{r.nonpos_jac_pct:.4f}"])
    head = ["recipe", "training data", "steps", "training time", "Dice 2 → 1 (30 IXI)", "% det J ≤ 0"]
    lines = [markdown_table(head, table), "",
             f"Measured {datetime.date.today().isoformat()} on {device_name(device)} (shared machine, 1-min load "
             f"average {load_average():.1f} when the table was written); `{command}`. Dice: nearest label warping at "
             f"full size (160×192×224), the network run at its training size and the field resampled back."]
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, rows: Sequence[Row], text: str) -> None:
    write_text(out_dir / "comparison.json", json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    write_text(out_dir / "comparison.md", text)
