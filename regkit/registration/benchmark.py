"""The registration benchmark's logic (``scripts/bench_register.py`` is its command line).

On the labelled real pairs of ``shared/data/real`` it reports, side by side, for each method:
mean Dice over the pair's labels, % of voxels with det J <= 0 and SDlogJ of the whole
transformation (:func:`regkit.metrics.jacobian_metrics`, every voxel of the fixed grid), the wall
time of the registration itself, and the CPU time of the process (regkit) or of the peer's
subprocess (its user + system time, file handling included), which a shared machine disturbs
less than the wall time.

Pairs (all on one grid and already aligned, so every method runs without an affine stage):

* ``subj2->subj1`` and ``subj1->subj2``: ``common_160x192x224``, the 30 IXI structures;
* ``oasis B->A``: ``oasis_lapirn_160x192x144``, label 2 (white matter) only (the two maps
  follow different protocols for label 1).

Every method's result is turned into a displacement on the fixed grid in fixed voxels and
evaluated by the same code (labels warped by nearest neighbour with :func:`regkit.spatial.warp`),
so the figures compare the transformations, not the tools' evaluation conventions. Peers
(ANTs, elastix, FireANTs) run in a subprocess under ``peer_python`` through
:mod:`regkit.peers <regkit.registration.peers>` (see its docstring for their settings and how
their maps are read back).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from regkit.data.io import PathLike, atomic_write, load_volume, save_nifti
from regkit.errors import InputError, MissingFileError, check_choice
from regkit.metrics import IXI_LABELS, dice, jacobian_metrics
from regkit.registration import peers as peers_module
from regkit.registration.pipeline import load_preset, plot_loss_curves
from regkit.spatial import identity_grid, warp

PEERS = peers_module.METHODS
PRESETS = ("fast", "accurate")


@dataclass
class Pair:
    """One labelled pair on one grid: images in [0, 1] and integer label maps ``(1, 1, *shape)``."""

    name: str
    moving: torch.Tensor
    fixed: torch.Tensor
    moving_labels: torch.Tensor
    fixed_labels: torch.Tensor
    labels: Sequence[int]
    affine: np.ndarray
    moving_path: Optional[Path] = None
    fixed_path: Optional[Path] = None


@dataclass
class Row:
    pair: str
    method: str
    dice: float
    nonpos_jac_pct: float
    sdlogj: float
    seconds: float
    cpu_seconds: float
    iterations: Optional[int] = None
    note: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)


def _image(path: Path, scale: float) -> torch.Tensor:
    return torch.from_numpy(load_volume(path).data / scale)[None, None].float()


def _labels(path: Path) -> torch.Tensor:
    return torch.from_numpy(load_volume(path, dtype=np.int32, label=True).data)[None, None]


def _shrink(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Every ``factor``-th voxel (images and labels alike: the reduced mode's small pairs)."""
    return x[(slice(None), slice(None)) + (slice(None, None, factor),) * (x.dim() - 2)].contiguous()


def real_pairs(root: PathLike, shrink: int = 1, names: Optional[Sequence[str]] = None) -> List[Pair]:
    """The labelled pairs of ``root`` (``shared/data/real``); ``shrink > 1`` keeps every
    ``shrink``-th voxel (reduced mode)."""
    root = Path(root)
    common, oasis = root / "common_160x192x224", root / "oasis_lapirn_160x192x144"
    if not common.is_dir() or not oasis.is_dir():
        raise MissingFileError(f"{root}: the real data folders common_160x192x224 and oasis_lapirn_160x192x144 "
                               f"are needed")
    s1 = (common / "subj1_vxm_norm.nii.gz", common / "subj1_vxm_aseg.nii.gz")
    s2 = (common / "subj2_niivueN_norm.nii.gz", common / "subj2_niivueN_aseg.nii.gz")
    oa = (oasis / "image_A_160x192x144.nii.gz", oasis / "image_A_160x192x144_seg_affinefixed.nii.gz")
    ob = (oasis / "image_B_160x192x144.nii.gz", oasis / "image_B_160x192x144_seg.nii.gz")
    specs = {"subj2->subj1": (s2, s1, 255.0, IXI_LABELS), "subj1->subj2": (s1, s2, 255.0, IXI_LABELS),
             "oasis B->A": (ob, oa, 1.0, (2,))}
    chosen = list(specs) if names is None else [check_choice("benchmark pair", n, specs) for n in names]
    pairs = []
    for name in chosen:
        (mi, ml), (fi, fl), scale, labels = specs[name]
        affine = load_volume(fi).affine.copy()
        if shrink > 1:
            affine[:3, :3] *= shrink
        pairs.append(Pair(name, _shrink(_image(mi, scale), shrink), _shrink(_image(fi, scale), shrink),
                          _shrink(_labels(ml), shrink), _shrink(_labels(fl), shrink), labels, affine, mi, fi))
    return pairs


def evaluate(pair: Pair, flow: torch.Tensor) -> Dict[str, float]:
    """Mean Dice of the warped moving labels, % det J <= 0 and SDlogJ of ``flow`` (fixed voxels)."""
    warped = warp(pair.moving_labels, flow.cpu(), mode="nearest")
    d = float(torch.nanmean(dice(warped, pair.fixed_labels, pair.labels)))
    jm = jacobian_metrics(flow.cpu())
    return {"dice": d, "nonpos_jac_pct": float(jm["nonpos_jac_pct"][0]), "sdlogj": float(jm["sdlogj"][0])}


def _timed(fn: Callable[[], Any]):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def run_preset(pair: Pair, preset, name: str, curves: Optional[PathLike] = None) -> Row:
    """A regkit pipeline (no affine stage: the pairs are aligned) on ``pair``; with ``curves``, its
    loss-curve PNG is drawn into that folder."""
    result, wall, cpu = _timed(lambda: preset.register(pair.moving, pair.fixed))
    if curves is not None:
        plot_loss_curves(result.stages, Path(curves) / f"{_slug(pair.name)}_{_slug(name)}.png",
                         title=f"{name}, {pair.name}")
    iters = sum(s.iterations for s in result.stages if not s.name.endswith("inverse"))
    levels = {f"level{s.level}_s": round(s.seconds, 2) for s in result.stages if not s.name.endswith("inverse")}
    return Row(pair.name, name, seconds=wall, cpu_seconds=cpu, iterations=iters, extra=levels,
               **evaluate(pair, result.flow))


def run_network(pair: Pair, predict: Callable, refine, name: str, refine_iterations: int = 0) -> List[Row]:
    """A network's prediction (``predict(moving, fixed) -> flow``), and the same refined."""
    flow, wall, cpu = _timed(lambda: predict(pair.moving, pair.fixed).detach())
    rows = [Row(pair.name, name, seconds=wall, cpu_seconds=cpu, **evaluate(pair, flow))]
    if refine is not None:
        result, w2, c2 = _timed(lambda: refine.register(pair.moving, pair.fixed, init_flow=flow))
        iters = sum(s.iterations for s in result.stages)
        rows.append(Row(pair.name, f"{name} + refine", seconds=wall + w2, cpu_seconds=cpu + c2, iterations=iters,
                        **evaluate(pair, result.flow)))
    return rows


def run_peer(pair: Pair, method: str, peer_python: str, threads: int, timeout: float = 3600) -> Row:
    """One peer tool in a subprocess; its map read back as fixed-voxel coordinates."""
    check_choice("peer method", method, PEERS)
    with tempfile.TemporaryDirectory(prefix="regkit-bench-") as tmp:
        paths = {}
        for key, img in (("moving", pair.moving), ("fixed", pair.fixed)):
            paths[key] = save_nifti(Path(tmp) / f"{key}.nii.gz", img[0, 0].numpy(), pair.affine)
        out = Path(tmp) / "result.npz"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads))
        env.pop("PYTHONPATH", None)  # the peer venv must not see this checkout's packages
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        cmd = [peer_python, peers_module.__file__, "--method", method, "--moving", str(paths["moving"]),
               "--fixed", str(paths["fixed"]), "--out", str(out), "--threads", str(threads)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise InputError(f"peer {method} failed (exit {proc.returncode}): {tail[0]}")
        z = np.load(out)
        coords = torch.from_numpy(z["coords"]).double()[None]
        seconds, version = float(z["seconds"]), str(z["version"])
    flow = (coords - identity_grid(pair.fixed.shape[2:], dtype=torch.float64)).float()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Row(pair.name, method, seconds=seconds, cpu_seconds=cpu, note=version, **evaluate(pair, flow))


def environment(threads: int, peer_python: Optional[str]) -> Dict[str, Any]:
    """Where and when the benchmark ran (the machine's load included: a shared machine's times
    are not a quiet machine's)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "device": "cpu", "cpu": cpu, "cores": os.cpu_count(),
            "threads": threads, "load_average": list(os.getloadavg()), "peer_python": peer_python}


def run_benchmark(data_root: PathLike, presets: Sequence[str] = PRESETS, peers: Sequence[str] = (),
                  peer_python: Optional[str] = None, threads: int = 2, reduced: bool = False,
                  pairs: Optional[Sequence[str]] = None, predict: Optional[Callable] = None,
                  refine_iterations: int = 50, curves: Optional[PathLike] = None,
                  log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run every method on every pair; returns ``{"environment": ..., "rows": [...]}``.

    ``reduced``: every 4th voxel, 4 + 3 iterations per preset, no peers (the test suite's
    mode). ``predict``: optional network ``(moving, fixed) -> flow`` (rows with and without
    ``refine_iterations`` of field-level refinement). ``curves``: a folder for the presets'
    loss-curve PNGs."""
    torch.set_num_threads(threads)
    if peers and not peer_python:
        raise InputError("peers were asked for but no --peer-python was given")
    for p in peers:
        check_choice("peer method", p, PEERS)
    for p in presets:
        check_choice("benchmark preset", p, PRESETS)
    env = environment(threads, peer_python if peers else None)
    all_pairs = real_pairs(data_root, shrink=4 if reduced else 1, names=pairs)
    rows: List[Row] = []
    built = {}
    for name in presets:
        overrides: Dict[str, Any] = {"affine": None, "progress": False, "device": "cpu"}
        if reduced:
            overrides["deformable.levels"] = [2, 1]
            overrides["deformable.iterations"] = [4, 3]
        built[name] = load_preset(name, **overrides)
    refine = None
    if predict is not None:
        refine = load_preset("refine", progress=False, device="cpu", **{"refine.iterations": refine_iterations}).refine
    if all_pairs and (built or predict is not None):
        # warm-up, untimed: the first registration in a process pays one-off costs (thread pools,
        # kernel selection, allocator growth: about 2 s here), which would be charged to whichever
        # method ran first; a half-size copy of the first pair runs every regkit method once beforehand
        small = real_pairs(data_root, shrink=8 if reduced else 2, names=[all_pairs[0].name])[0]
        for preset in built.values():
            preset.register(small.moving, small.fixed)
        if predict is not None:
            predict(small.moving, small.fixed)
    for pair in all_pairs:
        ident = torch.zeros(1, pair.fixed.dim() - 2, *pair.fixed.shape[2:])
        rows.append(Row(pair.name, "identity (aligned input)", seconds=0.0, cpu_seconds=0.0,
                        **evaluate(pair, ident)))
        for name, preset in built.items():
            rows.append(run_preset(pair, preset, f"regkit {name}", curves))
            log(_fmt_row(rows[-1]))
        if predict is not None:
            for row in run_network(pair, predict, refine, "regkit network", refine_iterations):
                rows.append(row)
                log(_fmt_row(row))
        if not reduced:
            for method in peers:
                try:
                    rows.append(run_peer(pair, method, peer_python, threads))
                except (InputError, subprocess.TimeoutExpired) as exc:
                    rows.append(Row(pair.name, method, float("nan"), float("nan"), float("nan"), float("nan"),
                                    float("nan"), note=f"failed: {exc}"))
                log(_fmt_row(rows[-1]))
    env["load_average_end"] = list(os.getloadavg())
    return {"environment": env, "reduced": reduced, "rows": [asdict(r) for r in rows]}


def _fmt_row(r: Row) -> str:
    return (f"{r.pair:14s} {r.method:26s} Dice {r.dice:.4f}  detJ<=0 {r.nonpos_jac_pct:.4f}%  SDlogJ {r.sdlogj:.3f}  "
            f"{r.seconds:7.1f} s wall  {r.cpu_seconds:7.1f} s CPU {r.note}")


def _env_line(env: Dict[str, Any], reduced: bool) -> str:
    what = f"{', '.join(env['methods'])}: " if env.get("methods") else ""
    return (f"{what}measured {env['date']} on {env['cpu']} ({env['cores']} cores, {env['threads']} threads), "
            f"torch {env['torch']}, device {env['device']}; load average at the start "
            f"{', '.join(f'{v:.2f}' for v in env['load_average'])}, at the end "
            f"{', '.join(f'{v:.2f}' for v in env.get('load_average_end', []))}"
            + (" (REDUCED mode: every 4th voxel, a few iterations)" if reduced else "") + ".")


def merge(results: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Several runs' results as one (each run's environment kept), e.g. the presets and the slow
    peers measured in separate runs. A (pair, method) measured more than once keeps its first
    row (every run repeats the identity row)."""
    if not results:
        raise InputError("no benchmark results to merge")
    rows: Dict[tuple, Dict[str, Any]] = {}
    source: Dict[tuple, int] = {}  # which run each kept row came from
    for i, r in enumerate(results):
        for row in r["rows"]:
            key = (row["pair"], row["method"])
            if key not in rows:
                rows[key], source[key] = row, i
    envs = []
    for i, r in enumerate(results):
        if r.get("runs"):  # an already merged file keeps its runs' own lists
            envs.extend(r["runs"])
            continue
        env = dict(r["environment"])
        kept = [key for key in rows if source[key] == i and not key[1].startswith("identity")]
        # a method measured again in an earlier-listed run is not credited to this one
        by_pair: Dict[str, List[str]] = {}
        for pair, method in kept:
            by_pair.setdefault(pair, []).append(method)
        measured_pairs = {row["pair"] for row in r["rows"]}
        if len(by_pair) == 1 and len(measured_pairs) == 1:
            env["methods"] = next(iter(by_pair.values()))
        else:  # say which pair each method was measured on
            env["methods"] = [f"{', '.join(methods)} ({pair})" for pair, methods in by_pair.items()]
        if env["methods"]:
            envs.append(env)
    pairs = list(dict.fromkeys(key[0] for key in rows))
    ordered = [row for pair in pairs for key, row in rows.items() if key[0] == pair]
    return {"environment": envs[0] if envs else dict(results[0]["environment"]), "runs": envs, "reduced": any(r.get("reduced") for r in results),
            "rows": ordered}


def target_checks(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Markdown rows of the issue's targets per pair, where the rows needed are present:
    accurate vs the best of ANTs CC and FireANTs (Dice; wall at most 1/5 and 1/2 of theirs;
    det J <= 0 below 0.01%), fast vs elastix (Dice; wall at most 1/2 of elastix's and 30 s)."""
    out = []
    by = {(r["pair"], r["method"]): r for r in rows}
    for pair in dict.fromkeys(r["pair"] for r in rows):
        acc, fast = by.get((pair, "regkit accurate")), by.get((pair, "regkit fast"))
        cc, fire, elx = by.get((pair, "ants_cc")), by.get((pair, "fireants")), by.get((pair, "elastix"))
        peers = [p for p in (cc, fire) if p is not None and p["dice"] == p["dice"]]
        if acc is not None and peers:
            best = max(peers, key=lambda p: p["dice"])
            ok = acc["dice"] >= best["dice"]
            ratio = "; ".join(f"{acc['seconds'] / p['seconds']:.2f} of {p['method']}'s wall "
                              f"(target {'0.20' if p is cc else '0.50'}), CPU {acc['cpu_seconds'] / p['cpu_seconds']:.2f}"
                              for p in peers if p["seconds"] > 0 and p["cpu_seconds"] > 0)
            out.append(f"| {pair} | accurate vs best of ANTs CC / FireANTs | Dice {acc['dice']:.4f} vs "
                       f"{best['dice']:.4f} ({best['method']}) {'met' if ok else 'NOT met'}; {ratio}; "
                       f"det J <= 0 {acc['nonpos_jac_pct']:.4f}% (target < 0.01) |")
        if fast is not None and elx is not None and elx["dice"] == elx["dice"]:
            ok = fast["dice"] >= elx["dice"]
            out.append(f"| {pair} | fast vs elastix | Dice {fast['dice']:.4f} vs {elx['dice']:.4f} "
                       f"{'met' if ok else 'NOT met'}; wall {fast['seconds']:.1f} s = "
                       f"{fast['seconds'] / elx['seconds']:.2f} of elastix's (target 0.50, and 30 s); CPU "
                       f"{fast['cpu_seconds'] / max(elx['cpu_seconds'], 1e-9):.2f} of elastix's |")
    head = ["Targets (time ratios mean something only when both rows come from one quiet run):", "",
            "| pair | target | measured |", "|---|---|---|"]
    return (head + out + [""]) if out else []


def markdown(results: Dict[str, Any]) -> str:
    """The docs/benchmarks.md section: the conditions, then one table per pair."""
    rows = results["rows"]
    runs = results.get("runs") or [results["environment"]]
    lines = ["## Registration: regkit presets vs ANTs SyN, elastix, FireANTs", "",
             "`scripts/bench_register.py` (docs/registration.md: settings of every peer, how each map is read "
             "back and evaluated).", ""]
    lines += [_env_line(env, results.get("reduced", False)) for env in runs]
    lines += ["Wall: the registration call alone (regkit's methods after one untimed warm-up registration of "
              "the first pair at half size); CPU: user + system time of the process (regkit) or of the "
              "peer's subprocess. Dice: mean over the pair's labels; det J and SDlogJ over every voxel of the "
              "fixed grid. Produced by `scripts/bench_register.py`. Times from a shared machine are not a quiet "
              "machine's: compare CPU times, and Dice (which load does not change).", ""]
    lines += target_checks(rows)
    for pair in dict.fromkeys(r["pair"] for r in rows):
        lines += [f"**{pair}**", "", "| method | Dice | % det J <= 0 | SDlogJ | wall s | CPU s | iterations | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["pair"] != pair:
                continue
            its = "" if r.get("iterations") is None else str(r["iterations"])
            lines.append(f"| {r['method']} | {r['dice']:.4f} | {r['nonpos_jac_pct']:.4f} | {r['sdlogj']:.3f} | "
                         f"{r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {its} | {r.get('note', '')} |")
        lines.append("")
    return "\n".join(lines)


def write_json(results: Dict[str, Any], path: PathLike) -> Path:
    text = json.dumps(results, indent=2, default=float)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def default_peer_python() -> Optional[str]:
    """``.peers-venv/bin/python`` beside this checkout, when it exists."""
    candidate = Path(__file__).resolve().parents[2] / ".peers-venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else None


__all__ = ["Pair", "Row", "real_pairs", "evaluate", "run_preset", "run_network", "run_peer", "run_benchmark",
           "markdown", "merge", "write_json", "environment", "default_peer_python", "PEERS", "PRESETS"]
