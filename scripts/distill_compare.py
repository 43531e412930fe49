#!/usr/bin/env python
"""Teacher vs distilled student vs student trained without distillation, on one dataset.

Trains three runs with the project's own configs (nothing here is specific to this script):

1. the teacher:   ``python train.py model=<teacher> loss=lncc_fast``
2. the student, distilled (ALDK):
                  ``python train.py experiment=distill teacher.ckpt=<1>/checkpoints/best.ckpt``
3. the student without distillation, same reconstruction loss (``ncc`` + ``grad``), same epochs:
                  ``python train.py model=student loss=ncc``

then evaluates each best checkpoint on the test split (``regkit.evaluation.evaluate``: Dice before
and after, % det J <= 0) and times CPU inference per pair (median of repeated forwards after a
warm-up, at the data size and at 160x192x224). Writes ``comparison.csv`` and ``comparison.md``
under ``--out-dir`` and, with ``--doc``, the marked section of that markdown file.

    .venv/bin/python scripts/distill_compare.py                        # embedded synthetic data
    .venv/bin/python scripts/distill_compare.py --doc docs/distillation.md
    .venv/bin/python scripts/distill_compare.py dataset=ixi dataset.root=/data/ixi --epochs 500 ...

Extra arguments are Hydra overrides passed to all three runs (e.g. the dataset).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from doc_sections import replace_section  # noqa: E402  (scripts/ is on sys.path when run as a script)

SECTION = "distill_compare"


def compose(overrides: Sequence[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def run(name: str, overrides: List[str], out_dir: Path, reuse: bool) -> Path:
    """Train one run into ``out_dir/name``; returns its best checkpoint."""
    from regkit.experiment import train

    run_dir = out_dir / name
    best = run_dir / "checkpoints" / "best.ckpt"
    if reuse and best.exists():
        print(f"[distill_compare] {name}: reusing {best}", flush=True)
        return best
    print(f"[distill_compare] {name}: python train.py {' '.join(overrides)}", flush=True)
    start = time.perf_counter()
    train(compose(overrides + [f"paths.output_dir={run_dir}", f"task_name={name}"]))
    print(f"[distill_compare] {name}: trained in {time.perf_counter() - start:.0f} s", flush=True)
    return best


def cpu_seconds(model: torch.nn.Module, shape: Sequence[int], reps: int) -> float:
    """Median CPU seconds of one forward (batch 1) after one warm-up call."""
    model = model.cpu().eval()
    x, y = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    times = []
    with torch.no_grad():
        model(x, y)
        for _ in range(reps):
            start = time.perf_counter()
            model(x, y)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="lkunet", help="teacher model name (default lkunet)")
    p.add_argument("--epochs", type=int, default=40, help="teacher epochs")
    p.add_argument("--student-epochs", type=int, default=40, help="epochs of both student runs")
    p.add_argument("--out-dir", type=Path, default=ROOT / "outputs" / "distill_compare")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs found in --out-dir")
    p.add_argument("--full-size", default="160,192,224", help="size for the second timing column ('' to skip)")
    p.add_argument("--reps", type=int, default=3, help="timed forwards per model and size")
    p.add_argument("--gammas", default="0.3",
                   help="comma-separated gamma values, one distilled student each (default 0.3, the paper's)")
    p.add_argument("--distill-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for the distilled runs only, e.g. trainer.flow_weight=1 (repeatable)")
    p.add_argument("--doc", type=Path, default=None, help="update the marked section of this markdown file")
    args, overrides = p.parse_known_args(argv)

    from regkit.evaluation import evaluate
    from regkit.checkpoint import load_checkpoint, load_model

    common = list(overrides)
    teacher = run("teacher", [f"model={args.teacher}", "loss=lncc_fast", f"trainer.max_epochs={args.epochs}"] + common,
                  args.out_dir, args.reuse)
    runs = {f"teacher ({args.teacher})": teacher}
    extra = list(args.distill_set)
    tag = "".join(f"_{o.split('.')[-1].replace('=', '')}" for o in extra)
    for gamma in [float(g) for g in args.gammas.split(",")]:
        label = f"student, distilled (ALDK, γ = {gamma:g}{', ' + ', '.join(extra) if extra else ''})"
        runs[label] = run(f"student_distilled_g{gamma:g}{tag}",
                          ["experiment=distill", f"teacher.ckpt={teacher}", f"trainer.gamma={gamma}",
                           f"trainer.max_epochs={args.student_epochs}"] + extra + common, args.out_dir, args.reuse)
    runs["student, no distillation"] = run("student_plain", ["model=student", "loss=ncc",
                                                             f"trainer.max_epochs={args.student_epochs}"] + common,
                                           args.out_dir, args.reuse)
    full = tuple(int(v) for v in args.full_size.split(",")) if args.full_size else None
    rows: List[Dict[str, object]] = []
    for label, ckpt in runs.items():
        result = evaluate(ckpt, split="test", out_dir=ckpt.parent.parent / "eval_test", with_hd95=False,
                          progress=False)
        s = result["summary"]
        meta = load_checkpoint(ckpt)
        model = load_model(ckpt)
        data_shape = tuple(int(v) for v in (meta.get("data") or {}).get("shape"))
        row = {"model": label, "name": meta["model"]["name"], "parameters": model.num_parameters(),
               "epoch": meta["epoch"], "dice_before": s["dice_before"]["mean"], "dice": s["dice"]["mean"],
               "dice_std": s["dice"]["std"], "pairs": s["dice"]["n"], "nonpos_jac_pct": s["nonpos_jac_pct"]["mean"],
               "cpu_s_data": cpu_seconds(model, data_shape, args.reps), "data_shape": "x".join(map(str, data_shape))}
        if full:
            row["cpu_s_full"] = cpu_seconds(model, full, args.reps)
        rows.append(row)
        print(f"[distill_compare] {label}: Dice {row['dice']:.4f} (before {row['dice_before']:.4f}), "
              f"{row['parameters']:,} parameters, {row['cpu_s_data']:.3f} s/pair", flush=True)

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "comparison.csv").write_text(buf.getvalue())

    full_txt = "x".join(map(str, full)) if full else None
    head = ["| model | parameters | test Dice (mean ± std over pairs) | % det J <= 0 | CPU s / pair at "
            f"{rows[0]['data_shape']}" + (f" | CPU s / pair at {full_txt}" if full else "") + " |",
            "|---|---|---|---|---|" + ("---|" if full else "")]
    lines = [f"Command: `.venv/bin/python scripts/distill_compare.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip() + "  ",
             f"Device: CPU {platform.machine()}, {torch.get_num_threads()} torch threads, load average "
             f"{os.getloadavg()[0]:.1f} | torch {torch.__version__} | {dt.date.today().isoformat()}", "",
             f"Test pairs: {rows[0]['pairs']}; Dice before registration: {rows[0]['dice_before']:.4f}. Teacher "
             f"{args.epochs} epochs, every student {args.student_epochs} epochs (Adam 1e-3, the demo's; discriminator Adam 1e-4); γ = 1 is the distillation trainer without the adversarial term; CPU time: median of {args.reps} "
             "forwards (batch 1, no gradient) after a warm-up.", ""] + head
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['dice']:.4f} ± {r['dice_std']:.4f} | "
                     f"{r['nonpos_jac_pct']:.3f} | {r['cpu_s_data']:.3f}" + (f" | {r['cpu_s_full']:.2f}" if full else "") + " |")
    text = "\n".join(lines) + "\n"
    (args.out_dir / "comparison.md").write_text(text)
    print(text)
    if args.doc:
        replace_section(args.doc, SECTION, text)
        print(f"[distill_compare] updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
