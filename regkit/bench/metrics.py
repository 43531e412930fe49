"""Evaluation-metric cost at full IXI size (160×192×224): Dice, the Jacobian metrics and HD95, and
regkit's exact HD95 against a brute-force reference (all surface-voxel pairs) on small labels;
MONAI's ``compute_hausdorff_distance`` beside it when SciPy is importable.

The label pair is real subjects 2 -> 1 of the shared real-data folder with their 30 IXI labels
when present, else two synthetic subjects at 160×192×224 (20 labels). Times are the fastest of
the timed calls after a warm-up call (:func:`regkit.bench.timing.time_calls`).
"""
from __future__ import annotations

import datetime
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import monai
import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

from regkit.bench.machine import device_name
from regkit.bench.report import markdown_table
from regkit.bench.timing import time_calls
from regkit.data import generate_synthetic, load_volume, synthetic_labels
from regkit.metrics import IXI_LABELS, _surface, dice, hd95, jacobian_metrics, one_hot

SECTION = "bench_metrics"
SHAPE = (160, 192, 224)
REAL_MOVING, REAL_FIXED = "subj2_niivueN_aseg.nii.gz", "subj1_vxm_aseg.nii.gz"


def _labels(path: Path) -> torch.Tensor:
    return torch.from_numpy(load_volume(path, np.int64, label=True).data)[None]


def label_pair(real_root: Optional[Path]) -> Tuple[torch.Tensor, torch.Tensor, List[int], str]:
    """(moving labels, fixed labels, label values, description), each map ``(1, *SHAPE)``."""
    real = Path(real_root) / "common_160x192x224" if real_root is not None else None
    if real is not None and (real / REAL_FIXED).exists():
        return _labels(real / REAL_MOVING), _labels(real / REAL_FIXED), list(IXI_LABELS), \
            "real subjects 2 -> 1, 30 IXI labels"
    with tempfile.TemporaryDirectory(prefix="regkit_bench_metrics_") as tmp:
        root = generate_synthetic(Path(tmp) / "s", shape=SHAPE, n_train=2, n_val=0, n_test=0, progress=False)
        moving, fixed = _labels(root / "labels" / "train_000.nii.gz"), _labels(root / "labels" / "train_001.nii.gz")
    return moving, fixed, list(synthetic_labels()), "synthetic subjects, 20 labels"


def brute_force_hd95(a: torch.Tensor, b: torch.Tensor, q: float = 0.95) -> float:
    """HD95 in voxels from the Euclidean distances between all surface-voxel pairs (chunked)."""
    pa, pb = _surface(a).nonzero().double(), _surface(b).nonzero().double()
    dab = torch.cat([torch.cdist(c, pb).amin(1) for c in pa.split(4096)])
    dba = torch.cat([torch.cdist(c, pa).amin(1) for c in pb.split(4096)])
    return max(torch.quantile(dab, q).item(), torch.quantile(dba, q).item())


def smooth_flow(shape: Sequence[int]) -> torch.Tensor:
    """A smooth random displacement ``(1, 3, *shape)`` of a few voxels, for the Jacobian metrics."""
    gen = torch.Generator().manual_seed(0)
    coarse = [max(2, s // 4) for s in shape]
    flow = torch.nn.functional.avg_pool3d(torch.randn(1, 3, *coarse, generator=gen) * 6, 5, 1, 2)
    return torch.nn.functional.interpolate(flow, size=tuple(shape), mode="trilinear", align_corners=True)


def monai_comparison(moving, fixed, labels, ours: torch.Tensor, t_ours: float) -> str:
    """One sentence: MONAI's HD95 time and its largest difference from regkit's (needs SciPy)."""
    try:  # MONAI's distance transform needs SciPy (or cuCIM), which regkit does not depend on
        import scipy
    except ImportError:
        return "MONAI `compute_hausdorff_distance` not compared: it needs SciPy, which is not installed."
    timing = time_calls(lambda: compute_hausdorff_distance(one_hot(moving, labels), one_hot(fixed, labels),
                                                           include_background=True, percentile=95), repeats=1)
    ref = timing.result.double()
    both = torch.isfinite(ours) & torch.isfinite(ref)
    return (f"MONAI {monai.__version__} `compute_hausdorff_distance` (SciPy {scipy.__version__} EDT), same "
            f"labels: {timing.fastest:.2f} s per pair; largest difference from regkit "
            f"{float((ours - ref)[both].abs().max()):.1e} mm (MONAI works in float32). "
            f"regkit / MONAI time: {t_ours / timing.fastest:.2f}.")


def run(real_root: Optional[Path], command: str) -> str:
    """Time the metrics on the label pair; returns the markdown section."""
    moving, fixed, labels, what = label_pair(real_root)
    flow = smooth_flow(moving.shape[1:])
    t_dice = time_calls(lambda: dice(moving, fixed, labels), repeats=2).fastest
    t_jac = time_calls(lambda: jacobian_metrics(flow), repeats=2).fastest
    hd95(moving, fixed, labels[:1])  # warm-up
    per, values = [], []
    for lab in labels:  # each label once; the pair's time is their sum
        start = time.perf_counter()
        values.append(hd95(moving, fixed, [lab]))
        per.append((time.perf_counter() - start, lab))
    t_hd, h = sum(t for t, _ in per), torch.cat(values, dim=1)
    smallest = sorted((int((moving == lab).sum() + (fixed == lab).sum()), lab) for lab in labels)[:5]
    rows = []
    for _, lab in smallest:
        ref = time_calls(lambda: brute_force_hd95(moving[0] == lab, fixed[0] == lab), repeats=1)
        t_ours, ours = next((t, h[0, labels.index(lab)].item()) for t, k in per if k == lab)
        rows.append([lab, f"{ours:.4f}", f"{ref.result:.4f}", f"{abs(ours - ref.result):.1e}", f"{t_ours:.3f}",
                     f"{ref.fastest:.3f}", f"{ref.fastest / t_ours:.1f}×"])
    slowest = sorted(per, reverse=True)[:3]
    lines = [
        "## Evaluation metrics at 160×192×224 (`scripts/bench_metrics.py`)", "",
        f"Run: `{command}` (the MONAI comparison runs when SciPy, which regkit does not depend on, is importable).",
        "",
        f"{what}; {device_name('cpu')}, torch {torch.__version__}, {datetime.date.today().isoformat()}. Best of "
        "runs after a warm-up; the machine may be shared, so compare within this table.", "",
        markdown_table(["metric", "seconds per pair"], [
            [f"Dice, {len(labels)} labels", f"{t_dice:.2f}"],
            ["% det J <= 0 and SDlogJ (float64)", f"{t_jac:.2f}"],
            [f"HD95, {len(labels)} labels (exact)", f"{t_hd:.2f}"]]).rstrip("\n"), "",
        "Slowest labels for HD95: " + ", ".join(f"{lab} ({t:.2f} s)" for t, lab in slowest) + ".", "",
        monai_comparison(moving, fixed, labels, h, t_hd), "",
        "Exactness and speed against a brute-force reference (Euclidean distances between all surface-voxel "
        "pairs, chunked `torch.cdist`) on the five smallest labels:", "",
        markdown_table(["label", "regkit HD95 (mm)", "brute force (mm)", "difference", "regkit s", "brute force s",
                        "ratio"], rows).rstrip("\n"),
    ]
    return "\n".join(lines) + "\n"
