"""Evaluate a trained model on a split: per-pair metrics, a per-subject CSV and a summary table.

``scripts/evaluate.py`` (console command ``regkit-evaluate``) is the command line;
:func:`pair_metrics` is shared with the validation callback, so training-time and final numbers
are computed the same way. Conventions: ``docs/evaluation.md``.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from regkit.device import move_to, resolve_device
from regkit.errors import InputError, check_choice
from regkit.metrics import FREESURFER_NAMES, dice, group_scores, hd95, jacobian_metrics

log = logging.getLogger("regkit")
LABEL_MODES = ("nearest", "linear")


def warp_labels(label_map: Tensor, flow: Tensor, labels, mode: str = "nearest") -> Tensor:
    """Warp an integer label map ``(B, 1, *spatial)`` by ``flow`` (voxels).

    ``nearest`` resamples the IDs directly; ``linear`` warps the one-hot maps of ``labels``
    (plus background) linearly and takes the arg-max, as the published IXI tables since 2022
    do. Published Dice moves by ~0.005-0.01 between the two, so the mode is always recorded.
    """
    from regkit.metrics import one_hot
    from regkit.spatial import warp

    if mode == "nearest":
        return warp(label_map.double(), flow.double(), mode="nearest").round().long()
    check_choice("label_mode", mode, LABEL_MODES)
    ids = [0] + [int(v) for v in labels if v != 0]
    warped = warp(one_hot(label_map, ids, dtype=flow.dtype), flow, mode="bilinear")
    return torch.as_tensor(ids, device=flow.device)[warped.argmax(1, keepdim=True)]


@torch.no_grad()
def pair_metrics(flow: Tensor, moving_label: Optional[Tensor] = None, fixed_label: Optional[Tensor] = None,
                 labels: Optional[Sequence[int]] = None, spacing: Optional[Sequence[float]] = None,
                 label_mode: str = "nearest", with_hd95: bool = False,
                 groups: Optional[Mapping[str, Sequence[int]]] = None) -> Dict[str, Tensor]:
    """Every metric of one batch.

    Args:
        flow: ``(B, ndim, *spatial)`` displacement in voxels.
        moving_label, fixed_label: ``(B, 1, *spatial)`` label maps (optional: without them only
            the Jacobian metrics are computed).
        labels: evaluated label values.
        spacing: voxel size in mm (HD95); default 1 mm.
        label_mode: ``nearest`` or ``linear`` label warping.
        with_hd95: compute HD95 (costly at full size: seconds per pair on a CPU).
        groups: optional ``{name: labels}`` averaged into group scores (e.g. the IXI 17).
    Returns:
        ``dice`` ``(B, L)``, ``dice_mean`` ``(B,)``, ``dice_groups`` ``(B, G)`` and
        ``dice_groups_mean`` ``(B,)`` with groups, ``hd95`` ``(B, L)`` and ``hd95_mean`` ``(B,)`` (mm)
        when asked, ``nonpos_jac_pct`` and ``sdlogj`` ``(B,)``; all float64 on the CPU.
    """
    out = {k: v.cpu() for k, v in jacobian_metrics(flow).items()}
    if moving_label is None or fixed_label is None or not labels:
        return out
    warped = warp_labels(moving_label, flow, labels, label_mode)
    per_label = dice(warped, fixed_label, labels).cpu()
    out["dice"] = per_label
    out["dice_mean"] = torch.nanmean(per_label, dim=1)
    if groups:
        g = group_scores(per_label, labels, groups)
        out["dice_groups"] = g
        out["dice_groups_mean"] = torch.nanmean(g, dim=1)
    if with_hd95:
        h = hd95(warped, fixed_label, labels, spacing)
        out["hd95"] = h
        out["hd95_mean"] = torch.nanmean(h, dim=1)
    return out


def _predict(model, moving: Tensor, fixed: Tensor, net_shape) -> Tensor:
    """The flow on the grid of ``moving``; the network sees the pair at ``net_shape`` (its
    training size) when that differs, e.g. to evaluate at full resolution a model trained with
    ``dataset.resize`` (run with ``--set dataset.resize=null``)."""
    from regkit.data.resample import resize_volume
    from regkit.spatial import resize_flow

    full = tuple(moving.shape[2:])
    if net_shape is None or tuple(net_shape) == full:
        return model(moving, fixed).flow
    flow = model(resize_volume(moving, net_shape), resize_volume(fixed, net_shape)).flow
    return resize_flow(flow, full)


# -- the command --------------------------------------------------------------------------------
def _fmt(v: float, digits: int = 4) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _stats(values: List[float]) -> Dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    if a.size == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std()), "median": float(np.median(a)), "n": int(a.size)}


def load_run(checkpoint, overrides: Sequence[str] = (), device: str = "cpu"):
    """The model, the checkpoint dict and the dataset (rebuilt from the checkpoint's config with
    ``overrides`` such as ``dataset.root=/data/ixi``)."""
    import yaml
    from omegaconf import OmegaConf

    from regkit.training.checkpoint import load_checkpoint, load_model

    ckpt = load_checkpoint(checkpoint)
    model = load_model(checkpoint).to(device).eval()
    cfg = OmegaConf.create(ckpt.get("config") or {})
    if "dataset" not in cfg:
        raise InputError(f"{checkpoint}: the checkpoint holds no dataset config; pass --pairs CSV")
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override '{item}' must be key=value, e.g. dataset.root=/data/ixi")
        key, value = item.split("=", 1)
        OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=False)
    return model, ckpt, cfg


def evaluate(checkpoint, split: str = "test", out_dir=None, overrides: Sequence[str] = (), pairs_csv=None,
             label_mode: str = "nearest", with_hd95: bool = True, device: str = "cpu", limit: Optional[int] = None,
             progress: bool = True) -> Dict[str, object]:
    """Run ``checkpoint`` over ``split`` and write ``per_subject.csv`` and ``summary.md``.

    Returns ``{"rows": [...], "summary": {...}, "csv": path, "markdown": path}``.
    """
    from hydra.utils import instantiate
    from tqdm.auto import tqdm

    from regkit.data.io import atomic_write
    from regkit.data.module import PairData

    check_choice("label_mode", label_mode, LABEL_MODES)
    dev = resolve_device(device)
    model, ckpt, cfg = load_run(checkpoint, overrides, "cpu")
    model.to(dev)
    if pairs_csv is not None:
        spec = ckpt.get("data") or {}
        data = PairData(train=pairs_csv, test=pairs_csv, normalize=spec.get("normalize", "minmax"),
                        resize=spec.get("resize"), eval_labels=spec.get("eval_labels"),
                        label_groups=spec.get("label_groups") or None)
        split = "test"
    else:
        data = instantiate(cfg.dataset)
    loader = data.dataloader(split)
    if loader is None:
        raise InputError(f"{checkpoint}: the dataset has no '{split}' pairs")
    labels = data.eval_labels
    groups = data.label_groups
    trained = (ckpt.get("data") or {}).get("shape")
    net_shape = tuple(int(v) for v in trained) if trained else None
    rows, per_label, per_group = [], [], []
    n = len(loader) if limit is None else min(limit, len(loader))
    with torch.no_grad():
        for k, batch in enumerate(tqdm(loader, total=n, desc=f"evaluating {split}", unit="pair", disable=not progress)):
            if k >= n:
                break
            batch = move_to(batch, dev)
            eval_shape = tuple(batch["moving"].shape[2:])
            start = time.perf_counter()
            flow = _predict(model, batch["moving"], batch["fixed"], net_shape)
            seconds = time.perf_counter() - start
            has = "moving_label" in batch and labels
            spacing = batch["spacing"][0].tolist() if "spacing" in batch else None
            m = pair_metrics(flow, batch.get("moving_label"), batch.get("fixed_label"), labels, spacing,
                             label_mode, with_hd95 and bool(has), groups)
            row = {"id": batch["id"][0], "label_mode": label_mode if has else "", "seconds": seconds,
                   "nonpos_jac_pct": float(m["nonpos_jac_pct"][0]), "sdlogj": float(m["sdlogj"][0])}
            if has:
                before = dice(batch["moving_label"], batch["fixed_label"], labels).cpu()
                row["dice_before"] = float(torch.nanmean(before[0]))
                row["dice"] = float(m["dice_mean"][0])
                if "dice_groups" in m:
                    row["dice_groups"] = float(m["dice_groups_mean"][0])
                if "hd95" in m:
                    row["hd95"] = float(m["hd95_mean"][0])
                for j, lab in enumerate(labels):
                    row[f"dice_{lab}"] = float(m["dice"][0, j])
                if "hd95" in m:
                    for j, lab in enumerate(labels):
                        row[f"hd95_{lab}"] = float(m["hd95"][0, j])
                per_label.append(m["dice"][0].numpy())
                if "dice_groups" in m:
                    per_group.append(m["dice_groups"][0].numpy())
            rows.append(row)
    if not rows:
        raise InputError(f"no pairs evaluated in split '{split}'")

    out = Path(out_dir) if out_dir is not None else Path(checkpoint).resolve().parent.parent / f"eval_{split}"
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, restval="")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    csv_path = atomic_write(out / "per_subject.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))

    summary = {key: _stats([r.get(key, math.nan) for r in rows])
               for key in ("dice_before", "dice", "dice_groups", "hd95", "nonpos_jac_pct", "sdlogj", "seconds")
               if any(key in r for r in rows)}
    lines = [f"# Evaluation: {Path(checkpoint).name}, split `{split}`", "",
             f"- checkpoint: `{checkpoint}` (model `{ckpt['model']['name']}`, epoch {ckpt.get('epoch')})",
             f"- pairs: {len(rows)}; device: {dev}; label warping: **{label_mode}**; evaluated at "
             f"{'x'.join(str(v) for v in eval_shape)}"
             + (f" (network at {'x'.join(str(v) for v in net_shape)})" if net_shape else ""),
             f"- labels: {len(labels) if labels else 0} evaluated" + (f", {len(groups)} groups" if groups else ""),
             "- conventions: docs/evaluation.md (Dice NaN for absent labels; HD95 in mm, inf when a structure "
             "vanishes; % |J| <= 0 of all voxels; SDlogJ over det J > 0)", "",
             "| metric | mean | std | median | n |", "|---|---|---|---|---|"]
    names = {"dice_before": "Dice before (identity)", "dice": "Dice (mean over labels)",
             "dice_groups": "Dice (mean over groups)", "hd95": "HD95 (mm, mean over labels)",
             "nonpos_jac_pct": "% voxels with det J <= 0", "sdlogj": "SD log det J", "seconds": "seconds per pair (network)"}
    for key, s in summary.items():
        lines.append(f"| {names[key]} | {_fmt(s['mean'])} | {_fmt(s['std'])} | {_fmt(s['median'])} | {s['n']} |")
    if groups and per_group:
        g = np.stack(per_group)
        flat = g[~np.isnan(g)]
        lines += ["", f"Dice over {len(groups)} groups × {len(per_group)} pairs (the published IXI convention: "
                  f"mean ± std over all structure-pair values): **{flat.mean():.4f} ± {flat.std():.4f}**", "",
                  "| structure | labels | Dice mean | std |", "|---|---|---|---|"]
        for j, (name, members) in enumerate(groups.items()):
            col = g[:, j]
            lines.append(f"| {name} | {', '.join(str(v) for v in members)} | {_fmt(float(np.nanmean(col)))} | {_fmt(float(np.nanstd(col)))} |")
    elif per_label:
        d = np.stack(per_label)
        lines += ["", "| label | name | Dice mean | std |", "|---|---|---|---|"]
        for j, lab in enumerate(labels):
            lines.append(f"| {lab} | {FREESURFER_NAMES.get(int(lab), '')} | {_fmt(float(np.nanmean(d[:, j])))} | {_fmt(float(np.nanstd(d[:, j])))} |")
    markdown = "\n".join(lines) + "\n"
    md_path = atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(markdown))
    return {"rows": rows, "summary": summary, "csv": csv_path, "markdown": md_path, "text": markdown}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from regkit.cli import exit_on_user_error

    parser = argparse.ArgumentParser(
        prog="regkit-evaluate",
        description="Run a checkpoint over a split; write per_subject.csv and summary.md.")
    parser.add_argument("checkpoint", help="a regkit checkpoint (best.ckpt, last.ckpt)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--out", default=None, help="output folder (default: <run>/eval_<split>)")
    parser.add_argument("--pairs", default=None, help="evaluate the pairs of this CSV instead of the training dataset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the checkpoint's config, e.g. --set dataset.root=/data/ixi (repeatable)")
    parser.add_argument("--label-mode", default="nearest", choices=LABEL_MODES,
                        help="label warping: nearest (default) or linear (one-hot)")
    parser.add_argument("--no-hd95", action="store_true", help="skip HD95 (seconds per pair at full size on a CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many pairs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    @exit_on_user_error
    def run():
        result = evaluate(args.checkpoint, args.split, args.out, args.overrides, args.pairs, args.label_mode,
                          not args.no_hd95, args.device, args.limit)
        print(result["text"])
        print(f"per-subject CSV: {result['csv']}\nsummary:         {result['markdown']}")

    run()
    return 0
