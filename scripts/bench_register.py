#!/usr/bin/env python
"""Registration benchmark: regkit's presets (and optionally a network with and without field-level
refinement) against ANTs SyN, elastix and FireANTs on the labelled real pairs, side by side: Dice,
% det J <= 0, SDlogJ, wall and CPU time. The logic is in ``regkit.registration.benchmark``; this
script parses the command line, builds the network's predictor when ``--checkpoint`` is given and
writes the results (JSON, and a marked section of docs/benchmarks.md).

The peers run in subprocesses under ``--peer-python`` (a separate environment with the ``bench``
extra's antspyx, itk-elastix and fireants; default: ./.peers-venv/bin/python when present).

    python scripts/bench_register.py --peers all --threads 2 --out docs/benchmarks.md \\
        --json bench_results/register.json                   # the full benchmark (about an hour)
    python scripts/bench_register.py --reduced               # seconds: small pairs, few iterations, no peers
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from regkit.bench.report import replace_section
from regkit.errors import RegkitError
from regkit.predictor import Predictor
from regkit.registration import benchmark

ROOT = Path(__file__).resolve().parents[1]
SECTION = "bench_register"


def network_predictor(checkpoint: str):
    """``(moving, fixed) -> flow`` of a trained regkit network: its :class:`~regkit.predictor.Predictor`
    (read weights-only; the scans normalised and resized as in its training)."""
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")

    def predict(moving, fixed):
        return predictor(predictor.prepare(moving), predictor.prepare(fixed)).flow

    return predict


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "real"), help="shared/data/real")
    parser.add_argument("--presets", nargs="*", default=list(benchmark.PRESETS), help="regkit presets to run")
    parser.add_argument("--peers", nargs="*", default=[],
                        help=f"peer tools: {', '.join(benchmark.PEERS)} or 'all' (need --peer-python)")
    parser.add_argument("--peer-python", default=None, help="python of the peers' environment")
    parser.add_argument("--pairs", nargs="*", default=None, help="subset of the pairs (default: all three)")
    parser.add_argument("--threads", type=int, default=2, help="threads for regkit and for every peer")
    parser.add_argument("--checkpoint", default=None, help="a regkit network: rows with and without --refine")
    parser.add_argument("--refine", type=int, default=50, help="refinement iterations of the network's field")
    parser.add_argument("--reduced", action="store_true", help="every 4th voxel, a few iterations, no peers")
    parser.add_argument("--json", default=None, help="write the results here (JSON)")
    parser.add_argument("--curves", default=None, help="folder for the presets' loss-curve PNGs")
    parser.add_argument("--from-json", nargs="+", default=None,
                        help="run nothing: merge these results files (e.g. presets and peers run apart)")
    parser.add_argument("--out", default=None, help="markdown file whose bench_register section is rewritten")
    args = parser.parse_args(argv)
    peers = list(benchmark.PEERS) if args.peers == ["all"] else args.peers
    peer_python = args.peer_python or (benchmark.default_peer_python() if peers else None)
    if args.from_json:
        try:
            results = benchmark.merge([json.loads(Path(p).read_text()) for p in args.from_json])
        except (OSError, ValueError, KeyError) as exc:
            print(f"regkit: error: cannot read --from-json results: {exc}", file=sys.stderr)
            return 2
        return _write(results, args)
    try:
        predict = network_predictor(args.checkpoint) if args.checkpoint else None
        results = benchmark.run_benchmark(args.data, presets=args.presets, peers=peers, peer_python=peer_python,
                                          threads=args.threads, reduced=args.reduced, pairs=args.pairs,
                                          predict=predict, refine_iterations=args.refine,
                                          curves=args.curves)
    except RegkitError as exc:
        print(f"regkit: error: {exc}", file=sys.stderr)
        return 2
    return _write(results, args)


def _write(results, args) -> int:
    text = benchmark.markdown(results)
    print(text)
    if args.json:
        benchmark.write_json(results, args.json)
    if args.out:
        replace_section(Path(args.out), SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
