#!/usr/bin/env python3
"""Scaling of one registration split over processes: wall time, peak memory per process, the share
of communication, and the largest pair that fits a memory budget per process.

    python scripts/bench_register_scaling.py --sizes 320 384 --processes 1 2 4            # CPU, full preset
    python scripts/bench_register_scaling.py --sizes 320 384 512 --processes 1 2 4 --device cuda   # N GPUs
    python scripts/bench_register_scaling.py --quick                                       # a minute: 64^3, 1-2 processes
    ... --out docs/benchmarks.md   # rewrite the register_scaling section there

Each run starts its processes with torchrun's environment (gloo on the CPU, NCCL on GPUs: one GPU
per process). Memory does not depend on the machine's load, times do: run it on a quiet machine.
The logic is in regkit/registration/scaling.py.
"""
import argparse
import json
import sys
from pathlib import Path

from regkit.bench.report import command_line, replace_section, write_text
from regkit.registration.scaling import markdown, merge, run_benchmark

ROOT = Path(__file__).resolve().parents[1]
SECTION = "register_scaling"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 384], help="cube sizes of the synthetic pair")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--preset", default="accurate")
    p.add_argument("--iterations", default=None, help="per level, e.g. 200,100,20 (default: the preset's)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / processes)")
    p.add_argument("--budget-gib", type=float, nargs="+", default=[16.0, 80.0], help="memory budgets per process")
    p.add_argument("--data", type=Path, default=ROOT / "bench_results" / "scaling_data", help="synthetic pairs (cache)")
    p.add_argument("--json", type=Path, default=ROOT / "bench_results" / "register_scaling.json")
    p.add_argument("--from-json", type=Path, nargs="+", default=None,
                   help="only redraw the table from earlier --json files (their runs together)")
    p.add_argument("--out", type=Path, default=None, help="markdown file whose register_scaling section is rewritten")
    p.add_argument("--quick", action="store_true", help="verification: 64^3, 1 and 2 processes, 2 iterations per level")
    p.add_argument("--note", default="", help="a line under the table's caption (e.g. the machine's conditions)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.processes, args.iterations = [64], [1, 2], "2,2,2"
    if args.from_json:
        results = merge([json.loads(path.read_text()) for path in args.from_json])
    else:
        iterations = [int(v) for v in args.iterations.split(",")] if args.iterations else None
        results = run_benchmark(args.sizes, args.processes, args.data, args.preset, iterations, args.device,
                                args.threads, log=lambda m: print(m, file=sys.stderr, flush=True))
        write_text(args.json, json.dumps(results, indent=1) + "\n")
    text = markdown(results, args.budget_gib, command_line("python scripts/bench_register_scaling.py",
                                                           sys.argv[1:] if argv is None else argv, ("--out", "--note")),
                    args.note)
    print(text)
    if args.out:
        replace_section(args.out, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
