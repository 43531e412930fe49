"""Evaluating registered pairs: one evaluation function for validation and ``regkit-evaluate``.

:class:`PairEvaluator` runs a predictor (any ``predict(moving, fixed) -> RegistrationOutput``,
usually a :class:`~regkit.predictor.Predictor`) over batches of pairs and computes every metric
of each pair: Dice per label before and after, group scores, HD95, the Jacobian metrics and the
loss terms. The validation callback is handed one (detectron2's ``EvalHook(period, function)``)
and reduces its rows to ``val/*`` scalars; :func:`evaluate_split` writes them as
``per_subject.csv`` and ``summary.md``. Training-time and final numbers are therefore computed by
the same code. Conventions: ``docs/evaluation.md``.
"""
from __future__ import annotations

import csv
import difflib
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from regkit.data.io import atomic_write, check_output_folder
from regkit.data.keypoints import batch_keypoint_metrics
from regkit.data.module import PairData
from regkit.device import move_to
from regkit.errors import InputError, check_choice
from regkit.metrics import FREESURFER_NAMES, LABEL_MODES, dice, pair_metrics
from regkit.models.base import RegistrationOutput
from regkit.predictor import Predictor

Predict = Callable[[Tensor, Tensor], RegistrationOutput]
_ABSENT = object()
Row = Dict[str, Any]


@dataclass
class EvaluationResult:
    """Per-pair rows (pair index -> scalars, plus per-label and per-group lists) and, for a
    picture, the first pair's batch and output."""

    rows: Dict[int, Row] = field(default_factory=dict)
    example: Optional[Tuple[Mapping[str, Any], RegistrationOutput]] = None


class PairEvaluator:
    """Metrics of every pair a predictor registers.

    Args:
        label_mode: ``nearest`` (default) or ``linear`` (one-hot) label warping; published Dice
            moves by ~0.005-0.01 between the two, so the choice is recorded with the results.
        jacobian: % of voxels with det J <= 0 and SD log det J (cheap).
        hd95: HD95 in mm per label (exact but costly: seconds per pair at 160×192×224 on a CPU
            for the 30 IXI labels).
        max_pairs: evaluate at most this many pairs (``None``: all).

    A row holds ``id``, ``seconds`` (the prediction), ``nonpos_jac_pct`` and ``sdlogj``; with
    label maps also ``dice_before`` (identity), ``dice`` (mean over the evaluated labels),
    ``dice_groups`` (mean over groups), ``hd95`` (mean over labels, mm), ``dice_<label>``,
    ``hd95_<label>``, and the lists ``per_label`` / ``per_group``; with keypoints (Learn2Reg),
    ``tre`` and ``tre_before`` in mm (:func:`regkit.metrics.keypoint_metrics`); with a loss,
    ``loss/<term>`` and ``loss/total``.
    """

    def __init__(self, label_mode: str = "nearest", jacobian: bool = True, hd95: bool = False,
                 max_pairs: Optional[int] = None) -> None:
        self.label_mode = check_choice("label_mode", label_mode, LABEL_MODES)
        self.jacobian, self.hd95 = bool(jacobian), bool(hd95)
        if max_pairs is not None and int(max_pairs) < 1:
            raise InputError(f"max_pairs must be >= 1 or null, got {max_pairs}")
        self.max_pairs = int(max_pairs) if max_pairs is not None else None

    def count(self, n: int) -> int:
        """How many of ``n`` pairs are evaluated."""
        return n if self.max_pairs is None else min(n, self.max_pairs)

    @torch.no_grad()
    def evaluate_pair(self, predict: Predict, batch: Mapping[str, Any], labels: Optional[Sequence[int]] = None,
                      groups: Optional[Mapping[str, Sequence[int]]] = None, loss_fn: Any = None,
                      dice_only: bool = False) -> Tuple[Row, RegistrationOutput]:
        """One pair (a batch of one, on the predictor's device): its row and the output.

        ``dice_only`` computes Dice alone (the unregistered baseline needs nothing else).
        """
        start = time.perf_counter()
        out = predict(batch["moving"], batch["fixed"])
        row: Row = {"id": batch["id"][0] if "id" in batch else "", "seconds": time.perf_counter() - start}
        has_labels = bool(labels) and batch.get("moving_label") is not None and batch.get("fixed_label") is not None
        spacing = batch["spacing"][0].tolist() if "spacing" in batch else None
        m = pair_metrics(out.flow, batch.get("moving_label") if has_labels else None, batch.get("fixed_label"),
                         labels, spacing, self.label_mode, self.hd95 and has_labels and not dice_only, groups)
        if self.jacobian and not dice_only:
            row["nonpos_jac_pct"], row["sdlogj"] = float(m["nonpos_jac_pct"][0]), float(m["sdlogj"][0])
        if has_labels:
            labels = [int(v) for v in labels]
            row["label_mode"] = self.label_mode
            row["dice_before"] = float(torch.nanmean(dice(batch["moving_label"], batch["fixed_label"], labels)[0]))
            row["dice"] = float(m["dice_mean"][0])
            row["per_label"] = m["dice"][0].tolist()
            if "dice_groups" in m:
                row["dice_groups"] = float(m["dice_groups_mean"][0])
                row["per_group"] = m["dice_groups"][0].tolist()
            if "hd95" in m:
                row["hd95"] = float(m["hd95_mean"][0])
            for j, lab in enumerate(labels):
                row[f"dice_{lab}"] = float(m["dice"][0, j])
            if "hd95" in m:
                for j, lab in enumerate(labels):
                    row[f"hd95_{lab}"] = float(m["hd95"][0, j])
        kp = batch_keypoint_metrics(out.flow, batch)
        if kp:  # Learn2Reg keypoint tasks: target registration error in mm
            row["tre"], row["tre_before"] = float(kp["tre"][0]), float(kp["tre_initial"][0])
        if loss_fn is not None and not dice_only:
            losses = loss_fn(out, batch)
            row.update({f"loss/{k}": float(v) for k, v in losses.terms.items()})
            row["loss/total"] = float(losses.total)
        return row, out

    def __call__(self, predict: Predict, batches: Iterable[Tuple[int, Mapping[str, Any]]], device: torch.device,
                 labels: Optional[Sequence[int]] = None, groups: Optional[Mapping[str, Sequence[int]]] = None,
                 loss_fn: Any = None, dice_only: bool = False, keep_example: bool = False,
                 progress: bool = False, total: Optional[int] = None) -> EvaluationResult:
        """Evaluate ``(index, batch)`` pairs (batch size 1); keeps the first pair's output when
        ``keep_example`` (for the validation picture)."""
        result = EvaluationResult()
        for k, batch in tqdm(batches, total=total, desc="evaluating", unit="pair", disable=not progress):
            batch = move_to(batch, device)
            row, out = self.evaluate_pair(predict, batch, labels, groups, loss_fn, dice_only)
            result.rows[k] = row
            if keep_example and result.example is None:
                result.example = (batch, out)
        return result

    @staticmethod
    def summarize(rows: Mapping[int, Row]) -> Dict[str, float]:
        """Mean over pairs (in pair order, NaN-ignoring) of every scalar column."""
        keys = [k for k in dict.fromkeys(k for r in rows.values() for k in r)
                if all(isinstance(r.get(k), (int, float)) for r in rows.values() if k in r)]
        out = {}
        for key in keys:
            values = np.array([rows[i][key] for i in sorted(rows) if key in rows[i]], dtype=np.float64)
            out[key] = math.nan if np.isnan(values).all() else float(np.nanmean(values))
        return out


# -- regkit-evaluate ----------------------------------------------------------------------------
def _fmt(v: Optional[float], digits: int = 4) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _stats(values: List[float]) -> Dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    if a.size == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std()), "median": float(np.median(a)), "n": int(a.size)}


SUMMARY_NAMES = {"dice_before": "Dice before (identity)", "dice": "Dice (mean over labels)",
                 "dice_groups": "Dice (mean over groups)", "hd95": "HD95 (mm, mean over labels)",
                 "nonpos_jac_pct": "% voxels with det J <= 0", "sdlogj": "SD log det J",
                 "tre_before": "keypoint TRE before (mm)", "tre": "keypoint TRE (mm)",
                 "seconds": "seconds per pair (network)"}


def evaluate_split(predictor, data, split: str = "test", out_dir=None, evaluator: Optional[PairEvaluator] = None,
                   progress: bool = True, title: str = "") -> Dict[str, Any]:
    """Register every pair of ``data``'s ``split`` with ``predictor`` and write
    ``per_subject.csv`` and ``summary.md`` into ``out_dir`` (each atomically).

    Returns ``{"rows", "summary", "csv", "markdown", "text"}``.
    """
    evaluator = evaluator or PairEvaluator(hd95=True)
    check_output_folder(out_dir)
    loader = data.dataloader(split)
    if loader is None:
        raise InputError(f"{title or 'the dataset'}: no '{split}' pairs")
    labels, groups = data.eval_labels, data.label_groups
    n = evaluator.count(len(loader))
    batches = ((k, b) for k, b in zip(range(n), loader))
    result = evaluator(predictor, batches, predictor.device, labels, groups, progress=progress, total=n,
                       keep_example=True)
    rows = [result.rows[k] for k in sorted(result.rows)]
    if not rows:
        raise InputError(f"no pairs evaluated in split '{split}'")
    eval_shape = tuple(result.example[0]["moving"].shape[2:])
    net_shape = predictor.network_shape(eval_shape)

    table = [{k: v for k, v in r.items() if not isinstance(v, list)} for r in rows]
    columns = list(dict.fromkeys(k for r in table for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, restval="")
    w.writeheader()
    for r in table:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    out = Path(out_dir)
    csv_path = atomic_write(out / "per_subject.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))

    summary = {key: _stats([r.get(key, math.nan) for r in rows]) for key in SUMMARY_NAMES if any(key in r for r in rows)}
    ckpt = predictor.checkpoint
    lines = [f"# Evaluation: {title}, split `{split}`", "",
             f"- checkpoint: `{predictor.source}` (model `{predictor.name}`, epoch {ckpt.get('epoch')})",
             f"- pairs: {len(rows)}; device: {predictor.device}; label warping: **{evaluator.label_mode}**; "
             f"evaluated at {'x'.join(str(v) for v in eval_shape)}"
             + (f" (network at {'x'.join(str(v) for v in net_shape)})" if net_shape != eval_shape else ""),
             f"- labels: {len(labels) if labels else 0} evaluated" + (f", {len(groups)} groups" if groups else ""),
             "- conventions: docs/evaluation.md (Dice NaN for absent labels; HD95 in mm, inf when a structure "
             "vanishes; % |J| <= 0 of all voxels; SDlogJ over det J > 0)", "",
             "| metric | mean | std | median | n |", "|---|---|---|---|---|"]
    for key, s in summary.items():
        lines.append(f"| {SUMMARY_NAMES[key]} | {_fmt(s['mean'])} | {_fmt(s['std'])} | {_fmt(s['median'])} | {s['n']} |")
    per_group = [r["per_group"] for r in rows if "per_group" in r]
    per_label = [r["per_label"] for r in rows if "per_label" in r]
    if groups and per_group:
        g = np.array(per_group, dtype=np.float64)
        flat = g[~np.isnan(g)]
        lines += ["", f"Dice over {len(groups)} groups × {len(per_group)} pairs (the published IXI convention: "
                  f"mean ± std over all structure-pair values): **{flat.mean():.4f} ± {flat.std():.4f}**", "",
                  "| structure | labels | Dice mean | std |", "|---|---|---|---|"]
        for j, (name, members) in enumerate(groups.items()):
            col = g[:, j]
            lines.append(f"| {name} | {', '.join(str(v) for v in members)} | {_fmt(float(np.nanmean(col)))} | "
                         f"{_fmt(float(np.nanstd(col)))} |")
    elif per_label:
        d = np.array(per_label, dtype=np.float64)
        lines += ["", "| label | name | Dice mean | std |", "|---|---|---|---|"]
        for j, lab in enumerate(labels):
            lines.append(f"| {lab} | {FREESURFER_NAMES.get(int(lab), '')} | {_fmt(float(np.nanmean(d[:, j])))} | "
                         f"{_fmt(float(np.nanstd(d[:, j])))} |")
    markdown = "\n".join(lines) + "\n"
    md_path = atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(markdown))
    return {"rows": table, "summary": summary, "csv": csv_path, "markdown": md_path, "text": markdown}


def dataset_from_checkpoint(predictor, overrides: Sequence[str] = (), pairs_csv=None):
    """The data module a checkpoint was trained with, rebuilt from its config with ``overrides``
    (``key=value``, e.g. ``dataset.root=/data/ixi``); or, with ``pairs_csv``, that CSV's pairs
    prepared as in training (the checkpoint's normalisation, size and labels)."""
    spec = predictor.spec
    if pairs_csv is not None:
        record = predictor.checkpoint.get("data") or {}
        return PairData(train=pairs_csv, test=pairs_csv, normalize=spec.normalize, resize=record.get("resize"),
                        eval_labels=list(spec.eval_labels) if spec.eval_labels else None,
                        label_groups=spec.label_groups)
    cfg = OmegaConf.create(predictor.checkpoint.get("config") or {})
    if "dataset" not in cfg:
        raise InputError(f"{predictor.source}: the checkpoint holds no dataset config; pass a pairs CSV")
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override '{item}' must be key=value, e.g. dataset.root=/data/ixi")
        key, value = item.split("=", 1)
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            keys = [str(k) for k in node] if OmegaConf.is_dict(node) else []
            close = difflib.get_close_matches(leaf, keys, n=1)
            hint = f"; did you mean {'.'.join(filter(None, [parent, close[0]]))}?" if close else ""
            raise InputError(f"--set {key}=...: the checkpoint's config has no such key{hint} "
                             f"(keys under '{parent or 'the root'}': {', '.join(keys) or 'none'})")
        OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=False)
    return instantiate(cfg.dataset)


def evaluate(checkpoint, split: str = "test", out_dir=None, overrides: Sequence[str] = (), pairs_csv=None,
             label_mode: str = "nearest", with_hd95: bool = True, device: str = "cpu", limit: Optional[int] = None,
             progress: bool = True) -> Dict[str, Any]:
    """What ``regkit-evaluate`` does: run ``checkpoint`` over ``split`` of its dataset (or of
    ``pairs_csv``) and write ``per_subject.csv`` and ``summary.md`` into ``out_dir`` (default:
    ``<run>/eval_<split>``)."""
    evaluator = PairEvaluator(label_mode=label_mode, hd95=with_hd95, max_pairs=limit)
    predictor = Predictor.from_checkpoint(checkpoint, device=device)
    data = dataset_from_checkpoint(predictor, overrides, pairs_csv)
    if pairs_csv is not None:
        split = "test"
    out = Path(out_dir) if out_dir is not None else Path(checkpoint).resolve().parent.parent / f"eval_{split}"
    return evaluate_split(predictor, data, split, out, evaluator, progress, title=Path(checkpoint).name)
