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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

import nibabel
import numpy as np
import torch

from regkit.bench.config import compose
from regkit.bench.epoch_time import read_scalars
from regkit.bench.machine import device_name, load_average
from regkit.bench.report import markdown_table, write_text
from regkit.checkpoint import load_checkpoint
from regkit.data.io import load_volume
from regkit.data.synth import fit_to_grid, reorient
from regkit.errors import InputError, MissingFileError
from regkit.experiment import train
from regkit.inference import load_inputs, registration_outputs
from regkit.metrics import IXI_LABELS, dice
from regkit.predictor import Predictor
from regkit.spatial import warp

SECTION = "generalise_compare"
GRID = "common_160x192x224"
IMAGE_GRID = (160, 192, 224)
HELD_OUT = {  # subject 2 -> subject 1: the pair no recipe may see
    "moving": f"{GRID}/subj2_niivueN_norm.nii.gz", "fixed": f"{GRID}/subj1_vxm_norm.nii.gz",
    "moving_label": f"{GRID}/subj2_niivueN_aseg.nii.gz", "fixed_label": f"{GRID}/subj1_vxm_aseg.nii.gz",
}
AFFINE_DICE = 0.611  # ../shared/data/real/README.md: affine alignment only, 30 IXI structures


def log(msg: str) -> None:
    print(f"[generalise_compare] {msg}", flush=True)


@dataclass
class Recipe:
    """One row of the comparison: a name, the ``train.py`` overrides that train it, and what it sees."""

    name: str
    overrides: List[str]
    sees: str

    @property
    def command(self) -> str:
        return "python train.py " + " ".join(self.overrides)


REAL_IMAGES = "images of subjects 1, 3, 4, 5 (12 pairs)"
RECIPES: Dict[str, Recipe] = {  # in training order: real_generalise starts from the shipped synth-brain
    "synth_brain": Recipe("**synth_brain** (data-free; ships as `synth-brain`)", ["experiment=synth_brain"],
                          "no image: label maps of the synthetic template, random shapes, the OASIS pair"),
    "real_generalise": Recipe("**real_generalise** (synth-brain fine-tuned; percentile, augment=light)",
                              ["experiment=real_generalise"], "synth-brain, then " + REAL_IMAGES),
    "real_scratch": Recipe("real images from scratch (percentile, augment=light)",
                           ["experiment=real_generalise", "init_from=null", "trainer.max_epochs=100"], REAL_IMAGES),
}
DEFAULT_RECIPES = ["synth_brain", "real_generalise"]


@dataclass
class Row:
    key: str
    recipe: str
    sees: str
    command: str
    run_dir: str
    steps: int
    train_seconds: float
    data_share: float
    dice: float
    dice_before: float
    nonpos_jac_pct: float
    sdlogj: float
    proxy_dice: float
    proxy_dice_before: float


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


OASIS = "oasis_lapirn_160x192x144"
PROXY = {"A": (f"{OASIS}/image_A_160x192x144.nii.gz", f"{OASIS}/image_A_160x192x144_seg_affinefixed.nii.gz"),
         "B": (f"{OASIS}/image_B_160x192x144.nii.gz", f"{OASIS}/image_B_160x192x144_seg.nii.gz")}


@torch.no_grad()
def score_proxy(checkpoint, real_root, device: str = "cpu") -> Dict[str, float]:
    """The development pair: OASIS B -> A (``oasis_lapirn_160x192x144``, neither subject 1 nor 2),
    reoriented to the common grid's LIA axes and padded to 160×192×224 as the synthesis does,
    registered in that voxel space; Dice of label 2 (white matter, the one label the two maps
    share; ``../shared/data/real/README.md``) before and after. Recipes were chosen on this pair,
    not on the held-out one."""
    root = Path(real_root).expanduser()
    predictor = Predictor.from_checkpoint(checkpoint, device=device)
    arrays = {}
    for key, (image, label) in PROXY.items():
        img = load_volume(root / image, np.float32)
        lab = load_volume(root / label, np.int64, label=True)
        codes = "".join(nibabel.aff2axcodes(img.affine))
        arrays[key] = (fit_to_grid(reorient(img.data, codes, "LIA"), IMAGE_GRID),
                       fit_to_grid(reorient(lab.data, codes, "LIA"), IMAGE_GRID))
    m = torch.from_numpy(predictor.normalize(arrays["B"][0]))[None, None].to(predictor.device)
    f = torch.from_numpy(predictor.normalize(arrays["A"][0]))[None, None].to(predictor.device)
    flow = predictor(m, f).flow
    moving_label = torch.from_numpy(arrays["B"][1])[None, None].to(flow.device)
    fixed_label = torch.from_numpy(arrays["A"][1])[None, None].to(flow.device)
    warped = warp(moving_label, flow, mode="nearest")
    return {"proxy_dice": float(dice(warped, fixed_label, [2])[0, 0]),
            "proxy_dice_before": float(dice(moving_label, fixed_label, [2])[0, 0])}


def run_summary(run_dir) -> Dict[str, Any]:
    """A finished run folder's last checkpoint, steps, training time (the sum of its epochs'
    ``time/epoch``: start-up and file checks left out) and mean ``time/data_share``."""
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    scalars = read_scalars(run_dir / "tensorboard", ("time/epoch", "time/data_share"))
    if not last.is_file() or not scalars.get("time/epoch"):
        raise MissingFileError(f"{run_dir}: not a finished training run (no checkpoints/last.ckpt or no timing logs)")
    shares = scalars.get("time/data_share", [])
    return {"checkpoint": last, "steps": int(load_checkpoint(last).get("global_step", 0)),
            "train_seconds": float(sum(scalars["time/epoch"])),
            "data_share": float(np.mean(shares)) if shares else float("nan")}


def train_recipe(key: str, out_dir: Path, overrides: Sequence[str] = (), reuse: bool = False) -> Path:
    """Train recipe ``key`` into ``out_dir/key`` with the project's own command (or reuse a
    finished run there); returns the run folder."""
    run_dir = out_dir / key
    if reuse and (run_dir / "checkpoints" / "last.ckpt").is_file():
        log(f"{key}: reusing {run_dir}")
        return run_dir
    args = RECIPES[key].overrides + list(overrides)
    log(f"{key}: python train.py {' '.join(args)}   (1-min load average now {load_average():.1f})")
    train(compose(args + [f"paths.output_dir={run_dir}", "callbacks.progress.enabled=false"]))
    log(f"{key}: done (1-min load average now {load_average():.1f})")
    return run_dir


def evaluate_run(key: str, run_dir, real_root, device: str = "cpu") -> Row:
    """The comparison row of a finished run: held-out Dice (2 -> 1), folding, the proxy pair."""
    recipe = RECIPES.get(key) or Recipe(key, [], "")
    info = run_summary(run_dir)
    held = score_checkpoint(info["checkpoint"], real_root, device)
    proxy = score_proxy(info["checkpoint"], real_root, device)
    row = Row(key, recipe.name, recipe.sees, recipe.command, str(run_dir), info["steps"], info["train_seconds"],
              info["data_share"], held["dice"], held["dice_before"], held["nonpos_jac_pct"], held["sdlogj"],
              proxy["proxy_dice"], proxy["proxy_dice_before"])
    log(f"{key}: Dice 2 -> 1 {row.dice:.4f} (affine {row.dice_before:.4f}), % det J <= 0 {row.nonpos_jac_pct:.4f}, "
        f"proxy {row.proxy_dice:.4f} (before {row.proxy_dice_before:.4f})")
    return row


def markdown(rows: Sequence[Row], command: str, device: str = "cpu") -> str:
    """The comparison table with its conditions (machine, load, date, command)."""
    table = [["affine alignment only (the scans' common grid)", "–", "–", "–", f"{AFFINE_DICE:.3f}", "–",
              f"{rows[0].proxy_dice_before:.3f}" if rows else "–"]]
    for r in rows:
        dice_cell = f"**{r.dice:.3f}**" if r.dice > AFFINE_DICE else f"{r.dice:.3f}"
        table.append([r.recipe, r.sees, str(r.steps), f"{r.train_seconds / 60:.1f} min", dice_cell,
                      f"{r.nonpos_jac_pct:.3f}", f"{r.proxy_dice:.3f}"])
    head = ["recipe", "training data", "steps", "training time", "Dice 2 → 1 (30 IXI)", "% det J ≤ 0",
            "OASIS B → A, WM (proxy)"]
    lines = [markdown_table(head, table, "llrrrrr"),
             f"Measured {datetime.date.today().isoformat()} on {device_name(device)}, a machine shared with other "
             f"jobs (1-min load average {load_average():.1f} when the table was written: the training times are "
             f"upper bounds); `{command}`. Training time: the sum of the epochs' wall time. Dice: nearest label "
             f"warping at full size (160×192×224), the network run at its training size (40×48×56) and the field "
             f"resampled back; affine alignment 0.611. Commands: "
             + "; ".join(f"`{r.key}`: `{r.command}`" for r in rows) + "."]
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, rows: Sequence[Row], text: str) -> None:
    write_text(out_dir / "comparison.json", json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    write_text(out_dir / "comparison.md", text)
