"""``regkit-register``: register a moving scan to a fixed one and write NIfTI outputs.

    regkit-register moving.nii.gz fixed.nii.gz -o out/ [--preset accurate|fast|affine]     # by optimisation
    regkit-register CKPT moving.nii.gz fixed.nii.gz -o out/ [--affine affine] [--refine 50]  # with a network
    torchrun --nproc_per_node=4 --no-python regkit-register moving.nii.gz fixed.nii.gz -o out/ --preset accurate

Only parses the command line; :func:`regkit.inference.register_files` does the work, or, in a
process torchrun started as one of several (``WORLD_SIZE > 1``), :func:`regkit.inference.register_files_split`
(one registration split over the processes; process 0 writes the same files).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

import yaml

from regkit.cli import exit_on_user_error, exit_quietly_after_rank_zero
from regkit.device import env_rank
from regkit.inference import MOVING_GRIDS, register_files, register_files_split, split_launch
from regkit.metrics import LABEL_MODES
from regkit.predictor import INTENSITY_POLICIES, SHAPE_POLICIES
from regkit.pretrained import list_pretrained, pretrained_path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="regkit-register",
        description="Register a moving NIfTI/MGH scan to a fixed one, by optimisation (two scans: affine "
                    "then diffeomorphic, --preset) or with a trained regkit checkpoint (three arguments: CKPT "
                    "MOVING FIXED). Outputs (on the fixed grid, with the fixed affine and header): warped, "
                    "flow_voxel, flow_mm (the whole transformation, affine included), jacdet[, warped_label]"
                    "[, inverse_flow_*][, affine.txt, affine.tfm], loss_curve.png, register.json. Under torchrun "
                    "(WORLD_SIZE > 1) one registration by optimisation is split over the processes (slabs of the "
                    "fixed grid) and process 0 writes the same files (no checkpoint, --refine, --finetune-steps or "
                    "label maps there).")
    p.add_argument("inputs", nargs="+", metavar="[CKPT] MOVING FIXED",
                   help="the moving and fixed scans, after a checkpoint when a network should register them")
    p.add_argument("--model", default=None,
                   help="a network shipped with regkit instead of a checkpoint file (then give MOVING FIXED): "
                        + ", ".join(list_pretrained()))
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--moving-label", default=None, help="label map of the moving scan (warped too)")
    p.add_argument("--fixed-label", default=None, help="label map of the fixed scan (Dice before/after)")
    p.add_argument("--labels", default=None,
                   help="labels for Dice: 'ixi' or comma-separated values (default: the checkpoint's, else all)")
    p.add_argument("--label-mode", default="nearest", choices=LABEL_MODES)
    p.add_argument("--shape-policy", default="resample", choices=SHAPE_POLICIES,
                   help="input size != training size: resample (default), native or reject")
    p.add_argument("--moving-grid", default="world", choices=MOVING_GRIDS,
                   help="moving on another grid: world (resample through the affines, default) or voxel")
    p.add_argument("--preset", default=None,
                   help="without a checkpoint: the registration preset (configs/registration/: accurate (default), "
                        "fast, affine)")
    p.add_argument("--affine", default=None,
                   help="the affine stage: a preset name (affine) or none; default: the preset's own without a "
                        "checkpoint, none with one")
    p.add_argument("--set", dest="preset_set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a preset setting, e.g. --set deformable.iterations=[100,50,10] (repeatable)")
    p.add_argument("--refine", type=int, default=0,
                   help="with a checkpoint: field-level instance optimisation of its prediction, N iterations")
    p.add_argument("--device", default="auto")
    p.add_argument("--timeout-min", type=float, default=30.0,
                   help="under torchrun (a split registration): how long a process waits for a silent one before "
                        "stopping (default 30)")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="instance optimisation: adapt the network to this pair first (Adam steps on the "
                        "training loss, images only; default 0 = off)")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="learning rate of --finetune-steps")
    p.add_argument("--intensity", default="rescale", choices=INTENSITY_POLICIES,
                   help="scans far outside the network's training intensity range (after its normalisation): "
                        "rescale onto it (default), error, or keep")
    return p


def parse_labels(value: Optional[str], p: argparse.ArgumentParser):
    if not value or value == "ixi":
        return value
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        p.error(f"--labels must be 'ixi' or comma-separated integers, got {value!r}")


def parse_sets(items, p: argparse.ArgumentParser):
    """``["key=value", ...]`` -> ``{key: value}``, values parsed as YAML (numbers, lists, null)."""
    out = {}
    for item in items:
        if "=" not in item:
            p.error(f"--set {item}: expected KEY=VALUE, e.g. deformable.iterations=[100,50,10]")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser()
    split = split_launch()
    if split and env_rank() != 0:
        p.error = lambda message: exit_quietly_after_rank_zero(2)  # a usage error: process 0 prints it
    args = p.parse_args(argv)
    # under torchrun the other processes print errors only
    logging.basicConfig(level=logging.INFO if env_rank() == 0 else logging.ERROR, format="%(message)s")
    labels = parse_labels(args.labels, p)
    if len(args.inputs) not in (2, 3):
        p.error(f"give MOVING FIXED (optimisation) or CKPT MOVING FIXED (a network), got {len(args.inputs)} "
                f"argument(s)")
    checkpoint = args.inputs[0] if len(args.inputs) == 3 else None
    if args.model is not None and checkpoint is not None:
        p.error("give a checkpoint file or --model NAME, not both")
    moving, fixed = args.inputs[-2:]

    @exit_on_user_error
    def run():
        ckpt = pretrained_path(args.model) if args.model else checkpoint
        if split:
            r = register_files_split(ckpt, moving, fixed, args.out, args.moving_label, args.fixed_label,
                                     args.device, preset=args.preset, affine=args.affine, refine=args.refine,
                                     finetune_steps=args.finetune_steps,
                                     preset_overrides=parse_sets(args.preset_set, p), timeout_min=args.timeout_min)
            if r is None:  # not process 0
                return
            print(f"split over {r['processes']} processes ({r['backend']}), rows of the last axis: "
                  f"{', '.join(f'{a}-{b}' for a, b in r['rows'])}")
        else:
            r = register_files(ckpt, moving, fixed, args.out, args.moving_label, args.fixed_label,
                               args.shape_policy, args.moving_grid, args.label_mode, labels, args.device,
                               args.finetune_steps, args.finetune_lr, intensity=args.intensity, preset=args.preset,
                               affine=args.affine, refine=args.refine, preset_overrides=parse_sets(args.preset_set, p))
        if r.get("finetune"):
            f = r["finetune"]
            print(f"instance optimisation: {f['steps']} steps, loss {f['loss_first']:.4f} -> {f['loss_final']:.4f} "
                  f"({f['seconds']:.1f} s)")
        for note in r["notes"]:
            print(f"note: {note}")
        for warning in r["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
        if "dice" in r:
            print(f"Dice over {len(r['labels'])} labels ({r['label_mode']} label warping): "
                  f"{r['dice_before']:.4f} before -> {r['dice']:.4f} after")
        print(f"% voxels with det J <= 0: {r['nonpos_jac_pct']:.4f}   SD log det J: {r['sdlogj']:.4f}")
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in r["seconds_per_stage"].items())
        print(f"{stages + ', ' if stages else ''}total {r['seconds_total']:.1f} s on {r['device']}")
        for name, path in (r.get("affine_files") or {}).items():
            print(f"{'affine (' + name + ')':13s} {path}")
        if r.get("loss_curve"):
            print(f"{'loss curves':13s} {r['loss_curve']}")
        for name, path in r["outputs"].items():
            print(f"{name:13s} {path}")

    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
