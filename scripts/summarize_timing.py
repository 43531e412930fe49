#!/usr/bin/env python
"""Turn a folder of training runs (a sweep, or single runs) into the epoch-time table.

    python scripts/summarize_timing.py outputs/epoch_time/multiruns/<date>_<time>
    python scripts/summarize_timing.py RUN_DIR [RUN_DIR ...] --out docs/epoch_time.md --png fig.png

Every run folder that has ``.hydra/`` (the composed config) and ``tensorboard/`` (event files) is
read; nothing is re-run. Per run it takes the per-epoch scalars that every regkit training run
logs (``time/epoch`` and the breakdown ``time/data``, ``time/forward``, ``time/loss``,
``time/backward``, ``time/optimizer``, ``throughput/samples_per_s``, peak memory), averages them over
epochs (the first epoch is left out when there are several, since it carries the warm-up) and
writes, in the FastLNCC preprint's layout, one row per model with seconds per epoch for
``lncc`` (Algorithm 1), ``lncc_group`` (Algorithm 2) and ``lncc_fast`` and the reductions; a
breakdown table; a CSV; and optionally a PNG bar chart in the style of the preprint's Figure 1.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import yaml

METHODS = ("lncc", "lncc_group", "lncc_fast")
LABELS = {"lncc": "five convs (Alg. 1)", "lncc_group": "grouped conv (Alg. 2)", "lncc_fast": "lncc_fast"}
BREAKDOWN = ("data", "forward", "loss", "backward", "optimizer")
MODEL_ORDER = ["vxm1", "vxm2", "lkunet4", "lkunet", "lkunet16", "transmorph", "student"]
MODEL_NAMES = {"vxm1": "VM-1", "vxm2": "VM-2", "lkunet": "LKU(8,5)", "lkunet16": "LKU(16,5)", "lkunet4": "LKU(4,5)",
               "transmorph": "TransMorph", "student": "Student"}


@dataclass
class Run:
    path: Path
    model: str
    loss: str
    epochs: List[int] = field(default_factory=list)
    scalars: Dict[str, List[float]] = field(default_factory=dict)
    shape: Optional[str] = None
    n_train: Optional[int] = None
    device: Optional[str] = None

    def mean(self, tag: str, skip_first: bool = True) -> float:
        values = self.scalars.get(tag, [])
        if skip_first and len(values) > 1:
            values = values[1:]
        return sum(values) / len(values) if values else float("nan")


def _choices(run_dir: Path) -> Dict[str, str]:
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.exists():
        data = yaml.safe_load(hydra_file.read_text()) or {}
        return dict(data.get("hydra", {}).get("runtime", {}).get("choices", {}) or {})
    return {}


def read_run(run_dir: Path) -> Optional[Run]:
    """One run folder -> Run, or None if it has no timing scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg_file = run_dir / ".hydra" / "config.yaml"
    tb = run_dir / "tensorboard"
    if not cfg_file.exists() or not tb.is_dir():
        return None
    cfg = yaml.safe_load(cfg_file.read_text()) or {}
    choices = _choices(run_dir)
    model = choices.get("model") or str(cfg.get("model", {}).get("_target_", "?")).rsplit(".", 1)[-1]
    loss = choices.get("loss") or next(iter(cfg.get("loss", {}).get("terms", {}) or {"?": 0}))
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    if "time/epoch" not in tags:
        return None
    run = Run(path=run_dir, model=model, loss=loss)
    run.epochs = [e.step for e in acc.Scalars("time/epoch")]
    for tag in tags:
        if tag.startswith(("time/", "throughput/", "memory/")):
            run.scalars[tag] = [e.value for e in acc.Scalars(tag)]
    ds = cfg.get("dataset", {}) or {}
    if "shape" in ds:
        run.shape = "×".join(str(s) for s in ds["shape"])
    run.n_train = ds.get("n_train")
    run.device = (cfg.get("trainer", {}) or {}).get("device")
    return run


def find_runs(paths: List[Path]) -> List[Run]:
    runs = []
    for root in paths:
        if not root.exists():
            sys.exit(f"summarize_timing: error: {root}: no such folder")
        candidates = [root] if (root / ".hydra").is_dir() else sorted(p.parent for p in root.rglob(".hydra"))
        for d in candidates:
            run = read_run(d)
            if run is not None:
                runs.append(run)
    return runs


def _fmt(x: float, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def reduction(base: float, new: float) -> float:
    return (base - new) / base * 100 if base and not math.isnan(base) and not math.isnan(new) else float("nan")


def table(runs: List[Run]) -> Dict[str, Dict[str, Run]]:
    """{model: {loss: run}}; when a model/loss pair occurs twice, the later run wins."""
    out: Dict[str, Dict[str, Run]] = {}
    for run in sorted(runs, key=lambda r: str(r.path)):
        out.setdefault(run.model, {})[run.loss] = run
    order = {m: i for i, m in enumerate(MODEL_ORDER)}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))


def markdown(grid: Dict[str, Dict[str, Run]]) -> str:
    lines = ["| model | " + " | ".join(f"{LABELS[m]} s/epoch" for m in METHODS)
             + " | Alg. 2 vs Alg. 1 | lncc_fast vs Alg. 1 | lncc_fast vs Alg. 2 |",
             "|---|" + "---:|" * (len(METHODS) + 3)]
    for model, by_loss in grid.items():
        t = {m: by_loss[m].mean("time/epoch") if m in by_loss else float("nan") for m in METHODS}
        lines.append(
            f"| {MODEL_NAMES.get(model, model)} | " + " | ".join(_fmt(t[m]) for m in METHODS)
            + f" | {_fmt(reduction(t['lncc'], t['lncc_group']), 1)}% | {_fmt(reduction(t['lncc'], t['lncc_fast']), 1)}%"
            + f" | {_fmt(reduction(t['lncc_group'], t['lncc_fast']), 1)}% |")
    lines += ["", "Breakdown (seconds per epoch, warm-up steps excluded; share of step time in brackets):", "",
              "| model | loss | " + " | ".join(BREAKDOWN) + " | samples/s | peak memory MiB |",
              "|---|---|" + "---:|" * (len(BREAKDOWN) + 2)]
    for model, by_loss in grid.items():
        for loss, run in by_loss.items():
            parts = {p: run.mean(f"time/{p}") for p in BREAKDOWN}
            total = sum(v for v in parts.values() if not math.isnan(v))
            cells = [f"{_fmt(parts[p])} ({_fmt(100 * parts[p] / total, 0) if total else '–'}%)" for p in BREAKDOWN]
            mem_tag = next((t for t in run.scalars if t.startswith("memory/")), None)
            mem = run.mean(mem_tag, skip_first=False) if mem_tag else float("nan")
            lines.append(f"| {MODEL_NAMES.get(model, model)} | {loss} | " + " | ".join(cells)
                         + f" | {_fmt(run.mean('throughput/samples_per_s'))} | {_fmt(mem, 0)} |")
    return "\n".join(lines)


def write_csv(path: Path, runs: List[Run]) -> None:
    cols = ["model", "loss", "epochs", "epoch_s"] + [f"{p}_s" for p in BREAKDOWN] + ["samples_per_s", "run"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in runs:
            w.writerow([r.model, r.loss, len(r.epochs), r.mean("time/epoch")] + [r.mean(f"time/{p}") for p in BREAKDOWN]
                       + [r.mean("throughput/samples_per_s"), str(r.path)])


def bar_chart(path: Path, grid: Dict[str, Dict[str, Run]], title: str) -> None:
    """Grouped bars, seconds per epoch per model and method (the preprint's Figure 1 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(grid)
    width = 0.8 / len(METHODS)
    colors = {"lncc": "#9e9e9e", "lncc_group": "#4c72b0", "lncc_fast": "#dd8452"}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 1.5 * len(models)), 4.4))
    for k, method in enumerate(METHODS):
        xs, ys = [], []
        for i, model in enumerate(models):
            if method in grid[model]:
                xs.append(i + (k - (len(METHODS) - 1) / 2) * width)
                ys.append(grid[model][method].mean("time/epoch"))
        bars = ax.bar(xs, ys, width, label=LABELS[method], color=colors[method])
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(range(len(models)), [MODEL_NAMES.get(m, m) for m in models])
    ax.set_ylabel("training time per epoch (s)")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, fontsize=8, ncol=len(METHODS), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=150)
    plt.close(fig)
    tmp.replace(path)


def describe(runs: List[Run]) -> str:
    shapes = sorted({r.shape for r in runs if r.shape})
    pairs = sorted({r.n_train for r in runs if r.n_train is not None})
    epochs = sorted({len(r.epochs) for r in runs})
    return (f"{len(runs)} runs; volume {', '.join(shapes) or '?'}; {', '.join(map(str, pairs)) or '?'} training pairs; "
            f"{', '.join(map(str, epochs))} epochs each (mean over epochs 2+ when there are several)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders or folders containing them (e.g. a sweep)")
    parser.add_argument("--out", type=Path, help="write the markdown here")
    parser.add_argument("--csv", type=Path, help="write a CSV here")
    parser.add_argument("--png", type=Path, help="write a bar chart here (needs matplotlib)")
    parser.add_argument("--title", default="Training time per epoch")
    args = parser.parse_args(argv)
    runs = find_runs(args.runs)
    if not runs:
        print(f"summarize_timing: error: no run with timing scalars under {', '.join(map(str, args.runs))}", file=sys.stderr)
        return 2
    grid = table(runs)
    text = describe(runs) + "\n\n" + markdown(grid)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.csv:
        write_csv(args.csv, runs)
    if args.png:
        bar_chart(args.png, grid, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
