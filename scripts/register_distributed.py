#!/usr/bin/env python3
"""Register a moving scan to a fixed scan by optimisation, split over processes (NIfTI in and out).

    torchrun --nproc_per_node=4 scripts/register_distributed.py moving.nii.gz fixed.nii.gz -o out/ --preset accurate
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        scripts/register_distributed.py moving.nii.gz fixed.nii.gz -o out/        # two machines
    python scripts/register_distributed.py moving.nii.gz fixed.nii.gz -o out/ --no-affine   # one process

Each process holds a slab of the fixed grid's last axis (gloo on the CPU, NCCL on GPUs); process 0
writes the outputs (warped, flow_voxel, flow_mm, jacdet, inverse_flow_voxel, register.json) on the
fixed grid with its header. The work is done by
:func:`regkit.registration.distributed.register_volumes_distributed`; see docs/registration.md.
"""
import argparse
import sys

import yaml

from regkit.errors import RegkitError
from regkit.registration.distributed import OUTPUTS, SUFFIXES, register_volumes_distributed
from regkit.registration.pipeline import list_presets


def parse_set(items):
    """``KEY=VALUE`` preset overrides (values as YAML, e.g. ``deformable.iterations=[50,20]``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"regkit: error: --set expects KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="register_distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("moving")
    p.add_argument("fixed")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--preset", default="accurate", help=f"one of {', '.join(list_presets())}")
    p.add_argument("--no-affine", action="store_true", help="the scans are aligned already (skip the affine stage)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset key")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"))
    p.add_argument("--timeout-min", type=float, default=30.0,
                   help="how long a process waits for a silent one before stopping (default 30)")
    p.add_argument("--outputs", default=",".join(OUTPUTS), help="comma-separated subset of " + ", ".join(OUTPUTS))
    p.add_argument("--suffix", default=".nii.gz", choices=SUFFIXES)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    overrides = parse_set(args.set)
    if args.no_affine:
        overrides["affine"] = None
    try:
        record = register_volumes_distributed(
            args.moving, args.fixed, args.out, preset=args.preset, overrides=overrides, device=args.device,
            backend=args.backend, timeout_min=args.timeout_min, outputs=[o for o in args.outputs.split(",") if o],
            suffix=args.suffix, progress=not args.no_progress)
    except RegkitError as exc:
        print(f"regkit: error: {exc}", file=sys.stderr)
        return 2
    if record is not None:
        final = [s for s in record["stages"] if s.get("loss_final") is not None]
        loss = f", final loss {final[-1]['loss_final']:.4f}" if final else ""
        print(f"{record['processes']} process(es) on {record['device']}: {record['seconds']['total']:.1f} s{loss}; "
              f"outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
