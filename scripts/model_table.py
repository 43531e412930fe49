"""Generate the model tables of docs/models.md from the registry: every count is computed here by
building the model, and every word comes from the model's registration (regkit.models.ModelInfo).

    .venv/bin/python scripts/model_table.py                        # print the markdown
    .venv/bin/python scripts/model_table.py --out docs/models.md   # rewrite its section there
    .venv/bin/python scripts/model_table.py --check docs/models.md # exit 1 if the section is stale
    .venv/bin/python scripts/model_table.py --macs 160 192 220 --models vxm2 transmorph  # per-op counts

Columns:
* parameters: built with the registered defaults (3-D and 2-D, one channel per image);
  tests/test_models.py checks the 3-D count against the registration's ``params``;
* multiply-adds: one forward pass of the network at 160x192x224 (batch 1), counted by PyTorch's
  own FLOP counter (torch.utils.flop_counter.FlopCounterMode) on the ``meta`` device, where no
  arithmetic runs (about a second for all models). What is counted: convolutions, transposed
  convolutions, linear layers and the attention's two matrix products (FLOPs / 2, each a
  multiply and an add), on the input zero-padded to the network's multiple, i.e.
  ``predict_field``. What is not: bias additions, normalisation, activations, softmax,
  pooling, interpolation, the warp (grid_sample) and the velocity integration, for which
  FlopCounterMode has no formula; so the full forward ``model(moving, fixed)`` has the same
  count (tests/test_models.py checks it on real CPU tensors);
* CPU forward: the median forward time that scripts/bench_models.py measured and wrote to
  docs/data/bench_models.json (its device, torch version, date and load are quoted under the
  table), or "not measured". Rerunning the benchmark changes that file, and then this table
  must be regenerated (the check says so).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

import regkit
from regkit.bench.report import read_section, replace_section
from regkit.errors import InputError
from regkit.models import MODELS
from regkit.models.base import pad_to_multiple

SECTION = "model_table"
ROOT = Path(__file__).resolve().parents[1]
BENCH_JSON = ROOT / "docs" / "data" / "bench_models.json"
SIZE = (160, 192, 224)
RATIO_TO = "transmorph"  # the "of TransMorph's" column divides by this model's count


def fmt(n: int) -> str:
    return f"{n:,}"


def multiply_adds(model: torch.nn.Module, size: Sequence[int]) -> Dict[str, int]:
    """Multiply-adds of ``model.predict_field`` on a ``(1, 2 * in_channels, *size)`` pair padded to
    the model's multiple, per counted op (``aten.convolution``, ``aten.mm``, ...): FlopCounterMode's
    FLOPs / 2. The model is moved to the ``meta`` device (no data, no arithmetic): pass one that
    is not needed afterwards."""
    model = model.to("meta").eval()
    x, _ = pad_to_multiple(torch.empty(1, 2 * model.in_channels, *size, device="meta"), model.size_multiple)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.predict_field(x)
    return {str(op): flops // 2 for op, flops in counter.get_flop_counts()["Global"].items()}


def bench_results(path: Path = BENCH_JSON) -> Optional[dict]:
    """scripts/bench_models.py's JSON if it measured the CPU at :data:`SIZE`, else ``None``."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("device") != "cpu" or tuple(data.get("size", ())) != SIZE:
        return None
    return data


def cpu_forward(bench: Optional[dict], name: str) -> str:
    result = ((bench or {}).get("results", {}).get(name) or {}).get("forward", {})
    if "median_s" not in result:
        return "not measured"
    return f"{result['median_s']:.2f}"


def reference_cell(count: int, info) -> str:
    if info.reference_params is None:
        return info.reference_note
    if info.reference_params == count:
        return "same"
    return f"{fmt(info.reference_params)} ({info.reference_note})"


def model_names() -> List[str]:
    """Every registered model: the table lists them all."""
    return regkit.list_models()


def rows(names: Optional[Iterable[str]] = None, bench: Optional[dict] = None):
    names = model_names() if names is None else list(names)
    ratio_base = regkit.create_model(RATIO_TO).num_parameters() if RATIO_TO in MODELS else None
    for name in names:
        info = MODELS.info(name)
        model = regkit.create_model(name)
        count = model.num_parameters()
        try:
            two_d = fmt(regkit.create_model(name, ndim=2).num_parameters())
        except InputError:
            two_d = "3-D only"
        integrates = f"yes, {model.int_steps} steps" if model.diffeomorphic else "no (`model.diffeomorphic=true`)"
        ratio = f"{100 * count / ratio_base:.2f}%" if ratio_base else "-"
        multiple = str(model.size_multiple)
        macs = sum(multiply_adds(model, SIZE).values())
        yield (f"`{name}`", info.description, fmt(count), ratio, reference_cell(count, info),
               f"{macs / 1e9:.2f} G", cpu_forward(bench, name), two_d, multiple, integrates)


def provenance_rows(names: Optional[Iterable[str]] = None):
    for name in (model_names() if names is None else names):
        info = MODELS.info(name)
        defining = ", ".join(f"`{k}={v}`" for k, v in MODELS.defaults(name).items())
        yield f"`{name}`", defining, info.paper or "-", info.source or "-"


def markdown_table(head: Sequence[str], body: Iterable[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(r) + " |" for r in body]


def table(names: Optional[Iterable[str]] = None, bench_path: Path = BENCH_JSON) -> str:
    names = model_names() if names is None else list(names)
    bench = bench_results(bench_path)
    size = "×".join(map(str, SIZE))
    head = ("`model=`", "what", "parameters (3-D)", "of TransMorph's", "reference code's count",
            f"multiply-adds at {size}", f"CPU forward at {size} (s)", "parameters (2-D)", "pads to a multiple of",
            "velocity integration")
    lines = markdown_table(head, rows(names, bench))
    lines += ["", "Generated by `scripts/model_table.py` from the registry (one input channel per image). \"same\": "
              "the reference build has exactly this count; both counts are checked in `tests/test_models.py`. "
              "Multiply-adds: one forward pass of the network, batch 1, counted by "
              "`torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2): convolutions, linear layers and attention "
              "products; not the warp, the integration, normalisation or activations (the script's docstring "
              "says exactly what).", ""]
    if bench is None:
        lines.append("CPU forward: not measured; `scripts/bench_models.py --out docs/benchmarks.md` measures it "
                     "(docs/data/bench_models.json).")
    else:
        lines.append(f"CPU forward: median forward time (eval, no gradients) from `scripts/bench_models.py` "
                     f"(docs/data/bench_models.json). {bench.get('conditions', '')}".rstrip())
    lines += ["", *markdown_table(("`model=`", "defining numbers (the registration's defaults)", "paper",
                                    "architecture read from"), provenance_rows(names))]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="markdown file whose model_table section to rewrite")
    ap.add_argument("--check", type=Path, help="exit 1 if this file's model_table section is not current")
    ap.add_argument("--macs", nargs="+", type=int, metavar="SIZE",
                    help="print the multiply-adds per counted op at this spatial size instead")
    ap.add_argument("--models", nargs="+", help="registry names for --macs (default: all)")
    args = ap.parse_args(argv)
    if args.macs:
        for name in args.models or model_names():
            ops = multiply_adds(regkit.create_model(name), args.macs)
            detail = ", ".join(f"{op} {n / 1e9:.2f} G" for op, n in ops.items())
            print(f"{name}: {sum(ops.values()) / 1e9:.2f} G multiply-adds at {'x'.join(map(str, args.macs))} "
                  f"({detail})")
        return 0
    text = table()
    if args.check:
        if read_section(args.check, SECTION) != text:
            print(f"{args.check}: the model table is out of date; "
                  f"run scripts/model_table.py --out {args.check}")
            return 1
        print(f"{args.check}: model table is current")
        return 0
    if args.out:
        replace_section(args.out, SECTION, text)
        print(f"wrote the model table to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
