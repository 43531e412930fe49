"""Teacher vs distilled student vs student trained without distillation, on one dataset.

Three kinds of run, each ``regkit.experiment.train`` on a config composed as ``train.py``
composes it (nothing here is specific to the comparison):

1. the teacher:   ``train.py model=<teacher> loss=lncc_fast``
2. the student, distilled (ALDK), one run per γ:
                  ``train.py experiment=distill teacher.ckpt=<1>/checkpoints/best.ckpt trainer.gamma=γ``
3. the student without distillation, same reconstruction loss (``ncc`` + ``grad``), same epochs:
                  ``train.py model=student loss=ncc``

then each best checkpoint is evaluated on the test split (:func:`regkit.evaluation.evaluate`:
Dice before and after, % det J <= 0) and its CPU inference is timed per pair (median of
repeated forwards after a warm-up, at the data size and optionally at another size).
"""
from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from regkit.bench.config import compose
from regkit.bench.machine import device_name, load_average
from regkit.bench.report import markdown_table, write_csv, write_text
from regkit.bench.timing import time_calls
from regkit.evaluation import evaluate
from regkit.experiment import train
from regkit.checkpoint import load_checkpoint, load_model

SECTION = "distill_compare"


def log(msg: str) -> None:
    print(f"[distill_compare] {msg}", flush=True)


def train_run(name: str, overrides: List[str], out_dir: Path, reuse: bool) -> Path:
    """Train one run into ``out_dir/name``; returns its best checkpoint (an existing one with
    ``reuse``)."""
    run_dir = out_dir / name
    best = run_dir / "checkpoints" / "best.ckpt"
    if reuse and best.exists():
        log(f"{name}: reusing {best}")
        return best
    log(f"{name}: python train.py {' '.join(overrides)}")
    start = time.perf_counter()
    train(compose(overrides + [f"paths.output_dir={run_dir}", f"task_name={name}"]))
    log(f"{name}: trained in {time.perf_counter() - start:.0f} s")
    return best


def cpu_seconds(model: torch.nn.Module, shape: Sequence[int], reps: int) -> float:
    """Median CPU seconds of one forward (batch 1, no gradient) after one warm-up call."""
    model = model.cpu().eval()
    x, y = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    with torch.no_grad():
        return time_calls(lambda: model(x, y), repeats=reps).median


def train_all(teacher: str, epochs: int, student_epochs: int, gammas: Sequence[float], distill_set: Sequence[str],
              overrides: Sequence[str], out_dir: Path, reuse: bool) -> Dict[str, Path]:
    """Train (or reuse) every run; ``{row label: best checkpoint}`` in table order."""
    common = list(overrides)
    teacher_ckpt = train_run("teacher", [f"model={teacher}", "loss=lncc_fast", f"trainer.max_epochs={epochs}"]
                             + common, out_dir, reuse)
    runs = {f"teacher ({teacher})": teacher_ckpt}
    extra = list(distill_set)
    tag = "".join(f"_{o.split('.')[-1].replace('=', '')}" for o in extra)
    for gamma in gammas:
        label = f"student, distilled (ALDK, γ = {gamma:g}{', ' + ', '.join(extra) if extra else ''})"
        runs[label] = train_run(f"student_distilled_g{gamma:g}{tag}",
                                ["experiment=distill", f"teacher.ckpt={teacher_ckpt}", f"trainer.gamma={gamma}",
                                 f"trainer.max_epochs={student_epochs}"] + extra + common, out_dir, reuse)
    runs["student, no distillation"] = train_run(
        "student_plain", ["model=student", "loss=ncc", f"trainer.max_epochs={student_epochs}"] + common, out_dir, reuse)
    return runs


def evaluate_runs(runs: Dict[str, Path], full: Optional[Sequence[int]], reps: int) -> List[Dict[str, Any]]:
    """One row per run: parameters, test Dice and folding, CPU seconds per pair."""
    rows = []
    for label, ckpt in runs.items():
        s = evaluate(ckpt, split="test", out_dir=ckpt.parent.parent / "eval_test", with_hd95=False,
                     progress=False)["summary"]
        meta = load_checkpoint(ckpt)
        model = load_model(ckpt)
        data_shape = tuple(int(v) for v in (meta.get("data") or {}).get("shape"))
        row = {"model": label, "name": meta["model"]["name"], "parameters": model.num_parameters(),
               "epoch": meta["epoch"], "dice_before": s["dice_before"]["mean"], "dice": s["dice"]["mean"],
               "dice_std": s["dice"]["std"], "pairs": s["dice"]["n"], "nonpos_jac_pct": s["nonpos_jac_pct"]["mean"],
               "cpu_s_data": cpu_seconds(model, data_shape, reps), "data_shape": "x".join(map(str, data_shape))}
        if full:
            row["cpu_s_full"] = cpu_seconds(model, full, reps)
        rows.append(row)
        log(f"{label}: Dice {row['dice']:.4f} (before {row['dice_before']:.4f}), {row['parameters']:,} parameters, "
            f"{row['cpu_s_data']:.3f} s/pair")
    return rows


def markdown(rows: List[Dict[str, Any]], command: str, epochs: int, student_epochs: int, reps: int,
             full: Optional[Sequence[int]]) -> str:
    full_txt = "x".join(map(str, full)) if full else None
    header = ["model", "parameters", "test Dice (mean ± std over pairs)", "% det J <= 0",
              f"CPU s / pair at {rows[0]['data_shape']}"] + ([f"CPU s / pair at {full_txt}"] if full else [])
    table = [[r["model"], f"{r['parameters']:,}", f"{r['dice']:.4f} ± {r['dice_std']:.4f}",
              f"{r['nonpos_jac_pct']:.3f}", f"{r['cpu_s_data']:.3f}"] + ([f"{r['cpu_s_full']:.2f}"] if full else [])
             for r in rows]
    lines = [f"Command: `{command}`  ",
             f"Device: CPU {device_name('cpu')}, load average {load_average():.1f} | torch {torch.__version__} | "
             f"{datetime.date.today().isoformat()}", "",
             f"Test pairs: {rows[0]['pairs']}; Dice before registration: {rows[0]['dice_before']:.4f}. Teacher "
             f"{epochs} epochs, every student {student_epochs} epochs (Adam 1e-3, the demo's; discriminator Adam "
             f"1e-4); γ = 1 is the distillation trainer without the adversarial term; CPU time: median of {reps} "
             "forwards (batch 1, no gradient) after a warm-up.", "", markdown_table(header, table)]
    return "\n".join(lines)


def write_results(out_dir: Path, rows: List[Dict[str, Any]], text: str) -> None:
    """``comparison.csv`` and ``comparison.md`` under ``out_dir``."""
    write_csv(out_dir / "comparison.csv", rows)
    write_text(out_dir / "comparison.md", text)
