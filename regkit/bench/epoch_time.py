"""The FastLNCC preprint's epoch-time table, from the logs of real training runs.

:func:`sweep_command` is the Hydra multirun of ``train.py experiment=epoch_time`` over models ×
{``lncc``, ``lncc_group``, ``lncc_fast``}: every job trains with regkit's Trainer and logs its
per-epoch timing to TensorBoard. :func:`summarize` reads any folder of finished runs (that
sweep, or other runs) without re-running anything: per run the per-epoch scalars that every
regkit training run logs (``time/epoch``, the phase breakdown ``time/<phase>``,
``throughput/samples_per_s``, peak memory), averaged over epochs (the first epoch is left out
when there are several, since it carries the warm-up); then one row per model with seconds per
epoch for ``lncc`` (Algorithm 1), ``lncc_group`` (Algorithm 2) and ``lncc_fast`` and the
reductions, a breakdown table, a CSV and optionally a bar chart in the style of the preprint's
Figure 1.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from regkit.bench.report import write_csv, write_text
from regkit.data.io import atomic_write
from regkit.errors import InputError, MissingFileError
from regkit.training.timing import PHASES

SECTION = "epoch_time"
METHODS = ("lncc", "lncc_group", "lncc_fast")
LABELS = {"lncc": "five convs (Alg. 1)", "lncc_group": "grouped conv (Alg. 2)", "lncc_fast": "lncc_fast"}
BREAKDOWN = tuple(PHASES)  # the trainer's timing phases, as it logs them (time/<phase>)
MODEL_ORDER = ["vxm1", "vxm2", "lkunet4", "lkunet", "lkunet16", "transmorph", "student"]
MODEL_NAMES = {"vxm1": "VM-1", "vxm2": "VM-2", "lkunet": "LKU(8,5)", "lkunet16": "LKU(16,5)", "lkunet4": "LKU(4,5)",
               "transmorph": "TransMorph", "student": "Student"}
PRESETS = {
    "gpu": dict(models="vxm1,vxm2,lkunet,lkunet16,transmorph", shape="160,192,224", pairs=403, epochs=5, extra=[]),
    # 8 pairs, cached in memory, on the CPU
    "cpu": dict(models="vxm1,vxm2", shape="80,96,112", pairs=8, epochs=3,
                extra=["dataset.cache=true", "dataset.num_workers=0", "trainer.device=cpu"]),
}


# -- the sweep ----------------------------------------------------------------------------------
def sweep_command(train_py: Path, sweep_dir: Path, models: str, losses: str, shape: str, pairs: int, epochs: int,
                  overrides: Sequence[str] = ()) -> List[str]:
    """``python train.py -m experiment=epoch_time model=... loss=...``: the grid as one multirun
    (Hydra's basic launcher runs the jobs one after another in one process)."""
    return [sys.executable, str(train_py), "-m", "experiment=epoch_time", f"model={models}", f"loss={losses}",
            f"dataset.shape=[{shape}]", f"dataset.n_train={pairs}", f"trainer.max_epochs={epochs}",
            f"hydra.sweep.dir={sweep_dir}", *overrides]


# -- reading runs -------------------------------------------------------------------------------
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


def read_scalars(tb_dir: Path, tags: Sequence[str]) -> Dict[str, List[float]]:
    """The values of TensorBoard scalars ``tags`` in ``tb_dir`` (a tag that is absent: no key)."""
    if not Path(tb_dir).is_dir():
        return {}
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    present = set(acc.Tags().get("scalars", []))
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in tags if tag in present}


def read_run(run_dir: Path) -> Optional[Run]:
    """One run folder -> Run, or None if it has no timing scalars."""
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


def find_runs(paths: Sequence[Path]) -> List[Run]:
    """Every run with timing scalars in ``paths`` (run folders, or folders containing them)."""
    runs = []
    for root in map(Path, paths):
        if not root.exists():
            raise MissingFileError(f"{root}: no such folder")
        candidates = [root] if (root / ".hydra").is_dir() else sorted(p.parent for p in root.rglob(".hydra"))
        for d in candidates:
            run = read_run(d)
            if run is not None:
                runs.append(run)
    return runs


# -- the tables ---------------------------------------------------------------------------------
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
            + f" | {_fmt(reduction(t['lncc'], t['lncc_group']), 1)}%"
            + f" | {_fmt(reduction(t['lncc'], t['lncc_fast']), 1)}%"
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


def csv_rows(runs: List[Run]) -> List[Dict[str, object]]:
    return [{"model": r.model, "loss": r.loss, "epochs": len(r.epochs), "epoch_s": r.mean("time/epoch"),
             **{f"{p}_s": r.mean(f"time/{p}") for p in BREAKDOWN},
             "samples_per_s": r.mean("throughput/samples_per_s"), "run": str(r.path)} for r in runs]


def bar_chart(path: Path, grid: Dict[str, Dict[str, Run]], title: str) -> None:
    """Grouped bars, seconds per epoch per model and method (the preprint's Figure 1 style)."""
    import matplotlib  # optional: the bench extra

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
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=150, format="png"))
    finally:
        plt.close(fig)


def describe(runs: List[Run]) -> str:
    shapes = sorted({r.shape for r in runs if r.shape})
    pairs = sorted({r.n_train for r in runs if r.n_train is not None})
    epochs = sorted({len(r.epochs) for r in runs})
    return (f"{len(runs)} runs; volume {', '.join(shapes) or '?'}; {', '.join(map(str, pairs)) or '?'} training pairs; "
            f"{', '.join(map(str, epochs))} epochs each (mean over epochs 2+ when there are several)")


def summarize(paths: Sequence[Path], out: Optional[Path] = None, csv: Optional[Path] = None,
              png: Optional[Path] = None, title: str = "Training time per epoch") -> str:
    """The table of the runs found under ``paths``; also written to ``out``, ``csv``, ``png``.
    Raises :class:`InputError` when no run there has timing scalars."""
    runs = find_runs(paths)
    if not runs:
        raise InputError(f"no run with timing scalars under {', '.join(map(str, paths))}")
    grid = table(runs)
    text = describe(runs) + "\n\n" + markdown(grid)
    if out:
        write_text(out, text + "\n")
    if csv:
        write_csv(csv, csv_rows(runs))
    if png:
        bar_chart(png, grid, title)
    return text
