"""``regkit-register``: register a moving scan to a fixed one and write NIfTI outputs.

Only parses the command line; :func:`regkit.inference.register_files` does the work.
"""
from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from regkit.cli import exit_on_user_error
from regkit.inference import MOVING_GRIDS, register_files
from regkit.metrics import LABEL_MODES
from regkit.predictor import SHAPE_POLICIES
from regkit.pretrained import list_pretrained, pretrained_path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="regkit-register",
        description="Register a moving NIfTI/MGH scan to a fixed one with a trained regkit checkpoint. "
                    "Outputs (on the fixed grid, with the fixed affine and header): warped, flow_voxel, "
                    "flow_mm, jacdet[, warped_label], register.json.")
    p.add_argument("checkpoint", nargs="?", help="a regkit checkpoint (or --model NAME)")
    p.add_argument("--model", default=None,
                   help="a checkpoint shipped with regkit instead of a file: " + ", ".join(list_pretrained()))
    p.add_argument("moving")
    p.add_argument("fixed")
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
    p.add_argument("--device", default="auto")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="instance optimisation: adapt the network to this pair first (Adam steps on the "
                        "training loss, images only; default 0 = off)")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="learning rate of --finetune-steps")
    return p


def parse_labels(value: Optional[str], p: argparse.ArgumentParser):
    if not value or value == "ixi":
        return value
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        p.error(f"--labels must be 'ixi' or comma-separated integers, got {value!r}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    labels = parse_labels(args.labels, p)
    if (args.checkpoint is None) == (args.model is None):
        p.error("give a checkpoint file or --model NAME (not both)")

    @exit_on_user_error
    def run():
        checkpoint = pretrained_path(args.model) if args.model else args.checkpoint
        r = register_files(checkpoint, args.moving, args.fixed, args.out, args.moving_label, args.fixed_label,
                           args.shape_policy, args.moving_grid, args.label_mode, labels, args.device,
                           args.finetune_steps, args.finetune_lr)
        if r["finetune"]:
            f = r["finetune"]
            print(f"instance optimisation: {f['steps']} steps, loss {f['loss_first']:.4f} -> {f['loss_final']:.4f} "
                  f"({f['seconds']:.1f} s)")
        for note in r["notes"]:
            print(f"note: {note}")
        if "dice" in r:
            print(f"Dice over {len(r['labels'])} labels ({r['label_mode']} label warping): "
                  f"{r['dice_before']:.4f} before -> {r['dice']:.4f} after")
        print(f"% voxels with det J <= 0: {r['nonpos_jac_pct']:.4f}   SD log det J: {r['sdlogj']:.4f}")
        print(f"network {r['seconds_network']:.2f} s, total {r['seconds_total']:.2f} s on {r['device']}")
        for name, path in r["outputs"].items():
            print(f"{name:13s} {path}")

    run()
    return 0
