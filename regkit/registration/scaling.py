"""How one registration scales over processes (``scripts/bench_register_scaling.py``).

A synthetic pair (:func:`regkit.data.synthetic.synthetic_pair`, written once as uncompressed
NIfTI so that each process reads only its slab) is registered with a preset by 1, 2, 4, ...
processes (:func:`regkit.registration.distributed.register_volumes_distributed`, each process
started with torchrun's environment variables). Per run and process: wall time, the time per
iteration of the full-resolution level, the share of that level's time spent in communication
(halo exchanges and reductions, waiting for the slowest process included), the peak resident
memory (``VmHWM``; on CUDA ``max_memory_allocated``) and the part of it above the process's size
after start-up (the registration's own memory). From those, a linear model of memory against
the voxels a process holds gives the largest cube that fits a memory budget per process.

Memory does not depend on the machine's load; times do, so the table states the machine and
its load average.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import nibabel
import numpy as np
import torch

from regkit.bench.machine import describe_machine
from regkit.bench.memory import reset_peak_rss, status_kib
from regkit.bench.report import markdown_table
from regkit.data.io import PathLike, save_nifti
from regkit.data.synthetic import synthetic_pair
from regkit.errors import InputError
from regkit.registration.distributed import register_volumes_distributed
from regkit.registration.pipeline import load_preset
from regkit.registration.slabs import split_rows

GiB = 2 ** 30
KiB = 1024


def synthetic_files(folder: PathLike, size: int, seed: int = 0) -> Tuple[Path, Path]:
    """``moving.nii`` (the atlas) and ``fixed.nii`` (a deformed subject) of
    :func:`~regkit.data.synthetic.synthetic_pair` at ``size³``, 1 mm, uncompressed float32 (a slab
    of the last axis is then one contiguous block a process reads alone); written once."""
    out = Path(folder) / f"synthetic_{size}_seed{seed}"
    paths = out / "moving.nii", out / "fixed.nii"
    if all(p.exists() for p in paths):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    moving, fixed = synthetic_pair((size, size, size), seed=seed)
    affine = np.eye(4)
    affine[:3, 3] = -(size - 1) / 2.0
    for path, image in zip(paths, (moving, fixed)):
        save_nifti(path, image.numpy().astype(np.float32), affine)
    return paths


@dataclass
class Run:
    """One registration by ``processes`` processes of a ``size³`` pair."""

    size: int
    processes: int
    ok: bool = True
    error: str = ""
    wall_seconds: float = 0.0            # the slowest process, start-up excluded
    stage_seconds: Dict[str, float] = field(default_factory=dict)
    levels: List[Dict[str, Any]] = field(default_factory=list)  # per level: shape, iterations, seconds, comm
    comm_seconds: List[float] = field(default_factory=list)     # per process, whole run
    held_rows: List[int] = field(default_factory=list)          # per process, full-resolution level
    halo: int = 0
    rss_start_bytes: List[int] = field(default_factory=list)    # per process, after start-up
    peak_bytes: List[int] = field(default_factory=list)         # per process: VmHWM or CUDA peak
    memory_kind: str = ""

    @property
    def above_start(self) -> List[int]:
        return [p - s for p, s in zip(self.peak_bytes, self.rss_start_bytes)] if self.memory_kind == "VmHWM" \
            else list(self.peak_bytes)


# -- one process of a run -----------------------------------------------------------------------
def worker(argv: Optional[Sequence[str]] = None) -> None:
    """One process of a run (started by :func:`launch` with torchrun's environment): register,
    then write this process's figures to ``<json>.<rank>``."""
    args = json.loads((list(argv) if argv is not None else sys.argv[1:])[0])
    torch.set_num_threads(int(args["threads"]))
    device = torch.device(args["device"] if args["device"] != "cuda" else f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    rss_start = status_kib("VmRSS") * KiB
    kind = "VmHWM" if reset_peak_rss() else "ru_maxrss"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        kind = "cuda max_memory_allocated"
    start = time.perf_counter()
    record = register_volumes_distributed(args["moving"], args["fixed"], args["out"], preset=args["preset"],
                                          overrides=args["overrides"], device=args["device"], progress=False,
                                          outputs=args["outputs"], profile=True, timeout_min=args["timeout_min"])
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else status_kib("VmHWM") * KiB
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{args['json']}.{rank}").write_text(json.dumps(
        {"rank": rank, "wall": wall, "rss_start": rss_start, "peak": peak, "kind": kind, "record": record}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(paths: Tuple[Path, Path], processes: int, preset: str, overrides: Dict[str, Any], device: str = "cpu",
           threads: Optional[int] = None, outputs: Sequence[str] = (), timeout_s: float = 7200,
           timeout_min: float = 10.0) -> Run:
    """Register ``paths`` with ``processes`` processes (each a fresh Python, as torchrun starts
    them) and collect their figures."""
    size = int(nibabel.load(str(paths[1])).shape[-1])
    threads = threads or max(1, (os.cpu_count() or 1) // processes)
    run = Run(size=size, processes=processes)
    with tempfile.TemporaryDirectory(prefix="regkit-scaling-") as tmp:
        args = {"moving": str(paths[0]), "fixed": str(paths[1]), "out": str(Path(tmp) / "out"), "preset": preset,
                "overrides": overrides, "device": device, "outputs": list(outputs), "threads": threads,
                "json": str(Path(tmp) / "figures.json"), "timeout_min": timeout_min}
        port = free_port()
        procs = []
        for rank in range(processes):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
                   "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": str(threads)}
            if processes == 1:
                for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
                    env.pop(key)
            cmd = [sys.executable, "-c", "import sys; from regkit.registration.scaling import worker; worker()",
                   json.dumps(args)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        errors = []
        for rank, p in enumerate(procs):
            try:
                _, err = p.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            if p.returncode:
                lines = [line for line in err.strip().splitlines() if line.strip()]
                errors.append(f"process {rank}: exit {p.returncode}: {lines[-1][:300] if lines else ''}")
        if errors:
            run.ok, run.error = False, "; ".join(errors)
            return run
        figures = sorted((json.loads(Path(f"{args['json']}.{r}").read_text()) for r in range(processes)),
                         key=lambda f: f["rank"])
    record = figures[0]["record"]
    run.wall_seconds = max(f["wall"] for f in figures)
    run.rss_start_bytes = [int(f["rss_start"]) for f in figures]
    run.peak_bytes = [int(f["peak"]) for f in figures]
    run.memory_kind = figures[0]["kind"]
    run.stage_seconds = {**{k: float(v) for k, v in record["seconds_per_stage"].items()},
                         "outputs": float(record["seconds_outputs"]), "total": float(record["seconds_total"])}
    run.comm_seconds = [float(s) for s in record["comm_seconds"]]
    run.levels = [{"level": s["level"], "shape": s["shape"], "iterations": s["iterations"], "seconds": s["seconds"],
                   "comm_seconds": s.get("comm_seconds", 0.0), "halo": s.get("halo", 0)}
                  for s in record["stages"] if s["name"] == "deformable"]
    full = record["shape"]
    if run.levels and run.levels[-1]["shape"] == full:
        run.halo = int(run.levels[-1]["halo"])
    rows = split_rows(full[-1], processes)
    run.held_rows = [min(full[-1], hi + run.halo) - max(0, lo - run.halo) for lo, hi in rows]
    return run


# -- the benchmark --------------------------------------------------------------------------------
def full_level_halo(preset: str, overrides: Dict[str, Any]) -> int:
    """The halo rows of the preset's finest level (``DeformableRegistration.halo``)."""
    stage = load_preset(preset, **overrides).deformable
    return stage.halo(len(stage.levels) - 1)


def fit_memory(runs: Sequence[Run]) -> Optional[Tuple[float, float]]:
    """Least-squares ``memory above start = a + b · voxels held`` (bytes; voxels of the
    full-resolution grid a process holds, halo included) over every process of every run."""
    xs, ys = [], []
    for r in runs:
        if not r.ok:
            continue
        for held, mem in zip(r.held_rows, r.above_start):
            xs.append(r.size * r.size * held)
            ys.append(mem)
    if len(set(xs)) < 2:
        return None
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def largest_cube(budget_bytes: float, processes: int, fit: Tuple[float, float], start_bytes: float, halo: int,
                 step: int = 16) -> int:
    """The largest ``n`` (a multiple of ``step``) whose ``n³`` registration fits ``budget_bytes`` per
    process by the fitted model: ``start + a + b · n² · (ceil(n / processes) + 2 · halo)``."""
    a, b = fit
    n, best = step, 0
    while n <= 65536:
        held = min(n, math.ceil(n / processes) + (2 * halo if processes > 1 else 0))
        if start_bytes + a + b * n * n * held > budget_bytes:
            break
        best = n
        n += step
    return best


def run_benchmark(sizes: Sequence[int], processes: Sequence[int], data: PathLike, preset: str = "accurate",
                  iterations: Optional[Sequence[int]] = None, device: str = "cpu", threads: Optional[int] = None,
                  outputs: Sequence[str] = (), log=print) -> Dict[str, Any]:
    """Every size with every process count (see the module docstring); plain data for the JSON."""
    if not sizes or not processes:
        raise InputError("give at least one size and one process count")
    overrides: Dict[str, Any] = {"affine": None}
    if iterations is not None:
        overrides["deformable.iterations"] = [int(i) for i in iterations]
    halo = full_level_halo(preset, overrides)
    machine = describe_machine(device, threads)
    runs = []
    for size in sizes:
        log(f"[scaling] synthetic pair {size}^3 ...")
        paths = synthetic_files(data, size)
        for n in processes:
            log(f"[scaling] {size}^3 on {n} process(es) ...")
            run = launch(paths, n, preset, overrides, device, threads, outputs)
            log(f"[scaling]   {'ok' if run.ok else 'FAILED: ' + run.error}: {run.wall_seconds:.1f} s, peak "
                f"{max(run.peak_bytes or [0]) / GiB:.2f} GiB per process")
            runs.append(run)
    return {"machine": asdict(machine), "preset": preset, "overrides": overrides, "device": device, "halo": halo,
            "runs": [{**asdict(r), "above_start": r.above_start} for r in runs]}


def merge(results: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Several benchmark results of one preset and settings as one (their runs in order; a later
    run of the same size and process count replaces an earlier one)."""
    if not results:
        raise InputError("nothing to merge")
    first = results[0]
    for r in results[1:]:
        if (r["preset"], r["overrides"], r["device"]) != (first["preset"], first["overrides"], first["device"]):
            raise InputError(f"cannot merge runs of preset {r['preset']} {r['overrides']} on {r['device']} with runs of "
                             f"{first['preset']} {first['overrides']} on {first['device']}")
    runs: Dict[Tuple[int, int], Dict[str, Any]] = {}
    for r in results:
        for run in r["runs"]:
            runs[(run["size"], run["processes"])] = run
    return {**first, "runs": [runs[k] for k in sorted(runs)]}


def _runs(results: Dict[str, Any]) -> List[Run]:
    fields = set(Run.__dataclass_fields__)
    return [Run(**{k: v for k, v in r.items() if k in fields}) for r in results["runs"]]


def markdown(results: Dict[str, Any], budgets_gib: Sequence[float] = (16.0, 80.0), command: str = "",
             note: str = "") -> str:
    """The docs/benchmarks.md section: one row per run, then the memory model and the largest
    cube per budget; ``note`` (e.g. the conditions of the machine) after the caption."""
    runs = _runs(results)
    m = results["machine"]
    single = {r.size: r for r in runs if r.ok and r.processes == 1}
    rows = []
    for r in runs:
        if not r.ok:
            rows.append([f"{r.size}³", r.processes, "–", "–", "–", "–", "–", "–", "–", f"failed: {r.error[:80]}"])
            continue
        full = r.levels[-1] if r.levels else {}
        per_it = full["seconds"] / full["iterations"] if full.get("iterations") else float("nan")
        share = full["comm_seconds"] / full["seconds"] if full.get("seconds") else 0.0
        above = max(r.above_start)
        ref = single.get(r.size)
        if ref is not None and r.processes > 1:
            ideal = max(ref.above_start) * max(r.held_rows) / r.size
            vs = f"{above / ideal:.2f}× of {ideal / GiB:.2f} GiB"
        else:
            vs = "–"
        rows.append([f"{r.size}³", r.processes, f"{max(r.held_rows)} of {r.size}", f"{r.wall_seconds:.1f}",
                     f"{per_it:.2f}", f"{100 * share:.1f}%", f"{max(r.peak_bytes) / GiB:.2f}", f"{above / GiB:.2f}",
                     vs, ""])
    lines = [f"Measured on {m['device']}: {m['device_name']} | torch {m['torch_version']} | {m['date']} | load average "
             f"{m['load_average']:.1f} at the start. Preset `{results['preset']}` with {results['overrides']}; "
             f"full-resolution halo {results['halo']} rows.", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    if note:
        lines += [note, ""]
    lines.append(markdown_table(
        ["pair", "processes", "rows held (full res.)", "wall s", "s / iteration (full res.)",
         "communication (full res.)", "peak GiB / process", "registration GiB / process", "vs (1/N + halo) of one",
         "note"], rows, "lrrrrrrrll"))
    lines.append("*rows held*: the largest slab plus its halo; *peak*: the process's peak resident size (VmHWM) or "
                 "CUDA peak allocation; *registration*: the peak above the process's size after start-up (torch "
                 "itself); *vs (1/N + halo) of one*: registration memory divided by the single process's scaled by "
                 "rows held / rows (target: at most 1.5×); *communication*: time inside halo exchanges and "
                 "reductions during the full-resolution level, waiting for the slowest process included.")
    fit = fit_memory(runs)
    if fit is not None:
        a, b = fit
        start = float(np.mean([s for r in runs if r.ok for s in r.rss_start_bytes]))
        lines += ["", f"Memory model (least squares over every process): registration memory = {a / GiB:.3f} GiB + "
                      f"{b:.0f} bytes × voxels held; start-up size {start / GiB:.2f} GiB.", ""]
        counts = sorted({r.processes for r in runs} | {1, 2, 4, 8})
        table = [[f"{g:g} GiB"] + [f"{largest_cube(g * GiB, n, fit, start, results['halo'])}³" for n in counts]
                 for g in budgets_gib]
        lines.append(markdown_table(["budget per process"] + [f"{n} process{'es' if n > 1 else ''}" for n in counts],
                                    table, "l" + "r" * len(counts)))
        lines.append("Largest cube (multiple of 16 voxels) that fits the budget per process by that model.")
    return "\n".join(lines) + "\n"
