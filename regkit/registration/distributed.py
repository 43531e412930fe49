"""One registration split over processes, files in and files out.

``torchrun --nproc_per_node=N --no-python regkit-register moving.nii.gz fixed.nii.gz -o out/
--preset accurate`` (or ``--nnodes`` with a rendezvous, as in docs/scaling.md) runs
:func:`register_volumes_distributed` on N processes (through
:func:`regkit.inference.register_files_split`): gloo on the CPU, NCCL on GPUs (one per process,
``cuda:LOCAL_RANK``). Without torchrun it is one process running the same code.

What each process holds (see :mod:`regkit.registration.slabs` for the exactness argument): its
rows of the fixed grid's last axis plus a halo, of the field, of its Adam moments and of the fixed
image, and the rows of the moving image its displacements reach. It reads them from the files
itself (:class:`VolumeFile`: nibabel's array proxy; a range of the last axis is one contiguous
block of a NIfTI file, so an uncompressed ``.nii`` is read only there, a ``.nii.gz`` is
decompressed up to it), so no process loads a whole volume for the deformable stage.

Steps, as :class:`~regkit.registration.pipeline.Pipeline` takes them in one process:

1. the affine stage, when the preset has one, on process 0 with the whole pair in host memory
   (it is cheap, and its pyramid starts coarse); its matrix is broadcast;
2. the moving scan resampled onto the fixed grid through ``inv(A_m) · T · A_f`` rows by rows
   (:class:`ResampledRows`: each read takes the box of the moving file those rows map into);
3. intensity normalisation with global statistics (minimum, maximum, the 99.9th percentile of
   the same voxel subset as one process: :func:`intensity_range`);
4. the deformable stage on slabs (:meth:`~regkit.registration.deformable.DeformableRegistration.run`);
5. the outputs on the fixed grid with the fixed header, computed per slab and streamed by
   process 0 into temporary files (:func:`write_nifti_rows`) that are renamed into place only
   when every output is complete: ``warped``, ``flow_voxel`` (the whole transformation, affine
   included), ``flow_mm``, ``jacdet``, ``inverse_flow_voxel`` and ``inverse_flow_mm`` (the
   inverse of the deformable part, when the preset computes it), then ``affine.txt`` /
   ``affine.tfm``, ``loss_curve.png`` and ``register.json``: the files ``regkit-register``
   writes in one process, with the same values and headers.

Failures: a process that dies or stops answering makes the others' next collective fail (a
closed connection at once, or the ``timeout_min`` of the process group); they stop with one line
(:class:`~regkit.registration.slabs.SplitRunError`) and process 0 deletes its temporary files, so
no output is left half-written. SIGTERM (torchrun stops the other workers when one fails) ends a
process the same way.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from regkit.data.io import PathLike, load_volume, nifti_image, open_image
from regkit.device import resolve_device
from regkit.distributed import cleanup, setup
from regkit.errors import InputError, MissingFileError, RegkitError, check_choice
from regkit.data.resample import transform_points
from regkit.registration.pipeline import NORMALIZE, Pipeline, fixed_grid, load_preset, plot_loss_curves, voxel_map, \
    whole_flow
from regkit.registration.result import StageRecord
from regkit.registration.slabs import Comm, RowSource, SlabResult, padded_rows, split_rows, whole_rows
from regkit.registration.tfm import write_itk_tfm, write_matrix_txt
from regkit.spatial import jacobian_determinant, sample_at

OUTPUTS = ("warped", "flow_voxel", "flow_mm", "jacdet", "inverse_flow_voxel", "inverse_flow_mm")
# the other files regkit-register writes: affine.txt + affine.tfm (with an affine stage), loss_curve.png
EXTRAS = ("affine_files", "loss_curve")
SUFFIXES = (".nii.gz", ".nii")
# voxels the quantile of the percentile normalisation reads at most (pipeline.normalize_intensity)
QUANTILE_VOXELS = 2 ** 22


# -- files read by boxes --------------------------------------------------------------------------
class VolumeFile:
    """A 3-D NIfTI/MGH volume on disk, read by boxes through nibabel's array proxy (values as
    :func:`regkit.data.io.load_volume` gives them: scaled, float32); only the header is read here."""

    def __init__(self, path: PathLike) -> None:
        p = Path(path)
        self.img = open_image(p)
        shape = tuple(int(s) for s in self.img.shape)
        self.extra_axis = len(shape) == 4 and shape[3] == 1
        if self.extra_axis:
            shape = shape[:3]
        if len(shape) != 3:
            raise InputError(f"{p}: expected a 3-D volume, got shape {shape}")
        self.path, self.shape = p, shape
        self.affine = np.asarray(self.img.affine, dtype=np.float64)
        self.header = self.img.header

    def read_box(self, box: Sequence[Tuple[int, int]]) -> np.ndarray:
        """The voxels ``[a0:b0, a1:b1, a2:b2]`` as float32."""
        slicer = tuple(slice(a, b) for a, b in box) + ((0,) if self.extra_axis else ())
        try:
            arr = np.asarray(self.img.dataobj[slicer])
        except Exception as exc:
            raise InputError(f"{self.path}: cannot read voxels {list(box)} ({type(exc).__name__}: {exc})") from None
        return arr.astype(np.float32, copy=not arr.flags.writeable)


class FileRows(RowSource):
    """A volume file on its own grid, as rows of its last axis."""

    def __init__(self, volume: VolumeFile, device) -> None:
        self.volume, self.device = volume, torch.device(device)
        self.shape, self.channels, self.dtype = volume.shape, 1, torch.float32

    def read(self, lo: int, hi: int) -> Tensor:
        box = [(0, n) for n in self.shape[:-1]] + [(lo, hi)]
        return torch.from_numpy(self.volume.read_box(box))[None, None].to(self.device)


def sample_file(volume: VolumeFile, pos: Tensor) -> Tensor:
    """The volume (float32, linear, zeros outside) at voxel positions ``pos`` ``(1, 3, *out)``
    (float64), as :func:`regkit.spatial.sample_at` gives it from the whole volume, bit
    for bit: only the rows of the file's last axis that the positions reach are read (whole
    planes of the other two), and the sampling kernel sees them as the whole volume
    (:func:`~regkit.registration.slabs.whole_rows`)."""
    n = volume.shape[-1]
    low, high = torch.aminmax(pos[:, -1])
    a, b = max(0, math.floor(float(low))), min(n, math.floor(float(high)) + 2)
    if a >= b:  # every position beyond the last axis: zeros, as outside the volume
        return torch.zeros(1, 1, *pos.shape[2:], dtype=torch.float32, device=pos.device)
    data = torch.from_numpy(volume.read_box([(0, s) for s in volume.shape[:-1]] + [(a, b)]))[None, None]
    # in the sampling dtype before the view: converting the view would copy all n rows
    data = padded_rows(data.to(pos.device), a, n, dtype=pos.dtype)
    return sample_at(whole_rows(data, a, n), pos).float()


class ResampledRows(RowSource):
    """The moving scan on the fixed grid through the voxel map ``vox`` (fixed voxel -> moving
    voxel, 4×4), rows of the fixed grid at a time: ``moving(vox @ x)`` as the pipeline computes it."""

    def __init__(self, volume: VolumeFile, vox: np.ndarray, shape: Sequence[int], device) -> None:
        self.volume, self.vox, self.device = volume, np.asarray(vox, np.float64), torch.device(device)
        self.shape, self.channels, self.dtype = tuple(int(s) for s in shape), 1, torch.float32

    def read(self, lo: int, hi: int) -> Tensor:
        pos = transform_points(self.vox, fixed_grid(self.shape, self.device, (lo, hi)))
        return sample_file(self.volume, pos)


class NormalizedRows(RowSource):
    """``source`` with intensities mapped by ``((x - lo) / (hi - lo)).clamp(max=1)`` (the
    pipeline's normalisation, with its global ``lo`` and ``hi``)."""

    def __init__(self, source: RowSource, value_range: Optional[Tuple[Tensor, Tensor]]) -> None:
        self.source, self.range = source, value_range
        self.shape, self.channels, self.dtype = source.shape, source.channels, source.dtype

    def read(self, lo: int, hi: int) -> Tensor:
        x = self.source.read(lo, hi)
        if self.range is None:
            return x
        low, high = self.range
        return ((x - low) / (high - low)).clamp_(max=1.0)


# -- global intensity statistics ------------------------------------------------------------------
def strided_subset(x: Tensor, lo: int, n: int, step: int) -> Tensor:
    """The values of ``x`` (rows ``lo..`` of a ``(1, 1, *lead, n)`` volume) whose C-order index
    in the whole volume is a multiple of ``step``: this process's part of the pipeline's strided
    quantile subset ``flat[::step]``."""
    if step == 1:
        return x.reshape(-1)
    rows = x.shape[-1]
    flat = x.reshape(-1, rows)
    z = torch.arange(lo, lo + rows, device=x.device, dtype=torch.int64)
    chunk = max(1, 2 ** 20 // rows)
    out = []
    for a in range(0, flat.shape[0], chunk):
        b = min(flat.shape[0], a + chunk)
        index = torch.arange(a, b, device=x.device, dtype=torch.int64)[:, None] * n + z
        out.append(flat[a:b][index % step == 0])
    return torch.cat(out)


def intensity_range(source: RowSource, comm: Comm, mode: str, name: str) -> Optional[Tuple[Tensor, Tensor]]:
    """The ``(lo, hi)`` of :func:`regkit.registration.pipeline.normalize_intensity` over the whole
    volume from this process's rows (``None`` for ``mode="none"``), after checking that every
    voxel is finite. ``percentile``: the 99.9th percentile of the same strided voxel subset as
    one process (each process contributes its part; the quantile of the gathered values)."""
    check_choice("intensity normalization", mode, NORMALIZE)
    n = source.shape[-1]
    lo, hi = split_rows(n, comm.world)[comm.rank]
    x = source.read(lo, hi)
    bad = comm.all_reduce_((~torch.isfinite(x)).sum().reshape(1), "sum")
    if int(bad):
        raise everywhere(InputError(f"{name} image has {int(bad)} NaN/inf voxels"))
    if mode == "none":
        return None
    low = comm.all_reduce_(x.amin().reshape(1), "min")[0]
    top = comm.all_reduce_(x.amax().reshape(1), "max")[0]
    if mode == "minmax":
        high = top
    else:
        numel = math.prod(source.shape)
        step = numel // QUANTILE_VOXELS + 1 if numel > QUANTILE_VOXELS else 1
        subset = comm.all_gather_cat(strided_subset(x, lo, n, step))
        high = torch.quantile(subset.float(), 0.999).to(x.dtype)
        if not high > low:
            high = top
    if not high > low:
        raise everywhere(InputError(f"{name}: the image is constant ({float(low)}); nothing to register"))
    return low, high


def check_finite_file(volume: VolumeFile, comm: Comm, name: str) -> None:
    """Every voxel of a file is finite (each process reads its rows of the file's last axis)."""
    n = volume.shape[-1]
    lo, hi = split_rows(n, comm.world)[comm.rank] if n >= comm.world else ((0, n) if comm.rank == 0 else (0, 0))
    bad = 0
    if hi > lo:
        bad = int((~np.isfinite(volume.read_box([(0, s) for s in volume.shape[:-1]] + [(lo, hi)]))).sum())
    total = comm.all_reduce_(torch.tensor([bad], device=comm.device), "sum")
    if int(total):
        raise everywhere(InputError(f"{volume.path}: contains {int(total)} NaN/inf voxels"))


# -- outputs streamed into one file ---------------------------------------------------------------
def nifti_header(shape: Sequence[int], dtype, affine: np.ndarray, header=None, intent: Optional[str] = None,
                 description: Optional[str] = None):
    """The header :func:`regkit.data.io.save_nifti` writes for an array of ``shape`` and
    ``dtype`` (the same steps, on a broadcast zero array that takes no memory)."""
    img = nifti_image(np.broadcast_to(np.zeros((), dtype=dtype), tuple(shape)), affine, header, intent, description)
    # what nibabel's to_file_map does before it writes the header
    img.get_data_dtype(finalize=True)
    img.update_header()
    return img.header


def write_nifti_rows(comm: Comm, path: PathLike, own: Tensor, parts: Sequence[Tuple[int, int]], shape: Sequence[int],
                     affine: np.ndarray, header=None, intent: Optional[str] = None,
                     description: Optional[str] = None) -> None:
    """Process 0 writes a NIfTI file (``.nii`` or ``.nii.gz``) of a volume cut in rows: ``own``
    ``(1, C, *shape[:-1], rows)`` is this process's rows ``parts[rank]``; ``C == 1`` gives a scalar
    image ``shape``, ``C > 1`` a vector image ``(*shape, 1, C)`` (NIfTI vector intent). The data go
    in Fortran order, component after component, each process's rows in turn: process 0 holds
    one block at a time. Every process calls this; only process 0 touches ``path``."""
    channels = int(own.shape[1])
    full = tuple(int(s) for s in shape) + ((1, channels) if channels > 1 else ())
    if comm.rank != 0:
        for c in range(channels):
            with comm.timed():
                dist.send(own[0, c].contiguous(), 0)
        return
    hdr = nifti_header(full, np.float32, affine, header, intent, description)
    out_dtype = hdr.get_data_dtype()
    path = Path(path)
    raw = open(path, "wb")
    stream = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) if path.name.endswith(".gz") else raw
    try:
        hdr.write_to(stream)
        offset = int(hdr.get_data_offset())
        if offset > stream.tell():  # nibabel's seek_tell(..., write0=True)
            stream.write(b"\0" * (offset - stream.tell()))
        for c in range(channels):
            for q, (lo, hi) in enumerate(parts):
                if q == 0:
                    block = own[0, c]
                else:
                    block = own.new_empty(*shape[:-1], hi - lo)
                    with comm.timed():
                        dist.recv(block, q)
                stream.write(np.asarray(block.cpu().numpy(), dtype=out_dtype).tobytes(order="F"))
                del block
    finally:
        if stream is not raw:
            stream.close()
        raw.close()


# -- the whole run --------------------------------------------------------------------------------
@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """SIGTERM raises SystemExit inside the block (so ``finally`` clauses remove temporary files);
    torchrun sends it to the other workers when one fails."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        print("regkit: stopped by SIGTERM (torchrun stops every process when one fails); no output written",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def everywhere(exc: BaseException) -> BaseException:
    """Mark a bad-input error (:class:`~regkit.errors.RegkitError`, also when Hydra wraps it) as
    raised with the same message on every process (a check on global values, or one made on
    process 0 and broadcast): a command-line app prints it on process 0 only
    (:func:`regkit.cli.exit_on_user_error`). An error only some processes meet stays unmarked and
    is printed where it happens. Returns ``exc``."""
    cause = exc.__cause__ if type(exc).__name__ == "InstantiationException" else exc
    if isinstance(cause, RegkitError):
        cause.every_process = True
    return exc


def _pipeline(preset: Union[str, Pipeline], overrides: Optional[Mapping[str, Any]], progress: bool) -> Pipeline:
    try:
        if isinstance(preset, Pipeline):
            pipe = preset
        else:
            pipe = load_preset(preset, **dict(overrides or {}))
            if not isinstance(pipe, Pipeline):
                raise InputError(f"preset '{preset}' is not a whole registration (Pipeline), got "
                                 f"{type(pipe).__name__}; a split registration (torchrun) needs a deformable stage")
        pipe.progress = bool(progress)
        pipe.sync_progress()
        if pipe.deformable is None:
            raise InputError("a split registration (torchrun) needs a deformable stage; this pipeline has none "
                             "(run an affine-only registration in one process)")
    except Exception as exc:
        raise everywhere(exc)
    return pipe


def on_rank_zero(comm: Comm, fn):
    """``fn()`` on process 0, its result on every process; a bad-input error there is raised on
    every process (the others would otherwise wait for it until the timeout)."""
    payload = None
    if comm.rank == 0:
        try:
            payload = ("ok", fn())
        except RegkitError as exc:
            payload = ("error", type(exc).__name__, str(exc))
            if not comm.split:
                raise everywhere(exc)
    payload = comm.broadcast_object(payload)
    if payload[0] == "error":
        raise everywhere((MissingFileError if payload[1] == "MissingFileError" else InputError)(payload[2]))
    return payload[1]


def on_every_process(comm: Comm, fn, what: str):
    """``fn()`` on every process. When it raises a bad-input error on some of them, every process
    raises the first such error (marked by :func:`everywhere`, so that it is printed once, naming
    the process when not all of them failed) instead of the others waiting for them until the
    timeout."""
    result, message = None, None
    try:
        result = fn()
    except RegkitError as exc:
        message = (type(exc).__name__, str(exc))
        if not comm.split:
            raise everywhere(exc)
    messages = [None] * comm.world
    if comm.split:
        with comm.timed():
            dist.all_gather_object(messages, message)
    failed = [(q, m) for q, m in enumerate(messages) if m is not None]
    if failed:
        q, (kind, text) = failed[0]
        if len(failed) < comm.world:
            text = f"{text} (on process {q} of {comm.world}, while {what})"
        raise everywhere((MissingFileError if kind == "MissingFileError" else InputError)(text))
    return result


def _run_affine(pipe: Pipeline, comm: Comm, moving: VolumeFile, fixed: VolumeFile):
    """The affine stage on process 0 (whole volumes in host memory); matrix and records broadcast."""

    def run():
        m, f = load_volume(moving.path), load_volume(fixed.path)
        mt, ft = torch.from_numpy(m.data)[None, None], torch.from_numpy(f.data)[None, None]
        return pipe._run_affine(mt, ft, m.affine, f.affine)

    return on_rank_zero(comm, run)


def _prepare_folder(out: Path) -> None:
    """The output folder, and no temporary file of an earlier run that was killed."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out}: cannot create the output folder ({exc.strerror})") from None
    for name in (*OUTPUTS, "register.json"):
        for stale in out.glob(f".{name}.tmp*"):
            stale.unlink(missing_ok=True)


def register_volumes_distributed(moving: PathLike, fixed: PathLike, out_dir: PathLike,
                                 preset: Union[str, Pipeline] = "accurate",
                                 overrides: Optional[Mapping[str, Any]] = None, device: Any = "auto",
                                 backend: str = "auto", timeout_min: float = 30.0,
                                 outputs: Sequence[str] = OUTPUTS + EXTRAS, suffix: str = ".nii.gz", margin: int = 8,
                                 progress: bool = True, profile: bool = False,
                                 finish: Optional[Callable[[Dict[str, Any]], None]] = None,
                                 preset_name: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Register ``moving`` to ``fixed`` (NIfTI/MGH files) with the preset, split over the
    processes torchrun started (one process without torchrun), and write the outputs.

    Every process calls this with the same arguments. Process 0 writes into ``out_dir`` the files
    ``regkit-register`` writes for the preset in one process (:mod:`regkit.inference`):
    ``<name><suffix>`` for each of ``outputs`` in :data:`OUTPUTS` (see the module docstring;
    ``inverse_flow_*`` only when the preset computes an inverse) on the fixed grid with the fixed
    header; for :data:`EXTRAS` in ``outputs``, ``affine.txt`` and ``affine.tfm`` (with an affine
    stage) and ``loss_curve.png`` (when matplotlib is installed); and ``register.json``: :func:`regkit.inference.register_files`'s record (stages, losses,
    Jacobian metrics over the whole grid, seconds) plus ``processes``, ``backend``, ``rows``,
    ``shape`` and ``comm_seconds`` (communication time per process).

    Args:
        preset: a preset name (``configs/registration/``) or a :class:`Pipeline`;
            ``overrides`` its keys (e.g. ``{"affine": None}``).
        device: ``auto`` (``cuda:LOCAL_RANK`` when CUDA is available, else the CPU), ``cpu``, ``cuda``.
        backend: ``auto`` (NCCL on CUDA, gloo on the CPU), ``gloo`` or ``nccl``.
        timeout_min: how long a collective waits for a silent process before failing.
        margin: rows of the moving image held beyond what its displacements reach (grown on demand).
        profile: synchronise CUDA around communication calls so that their time is exact.
        finish: called on process 0 with the record once every output is computed, before
            ``register.json`` is written (e.g. to add warnings).
        preset_name: the name recorded as ``preset`` (default: ``preset`` when it is a name).
    Returns:
        On process 0 the ``register.json`` record, elsewhere ``None``.
    Raises:
        InputError / MissingFileError: bad input (on every process, the same line, marked by
        :func:`everywhere`, when the check is a global one);
        :class:`~regkit.registration.slabs.SplitRunError`: another process died or stopped answering.
    """
    check_choice("output suffix", suffix, SUFFIXES)
    for name in outputs:
        check_choice("output", name, OUTPUTS + EXTRAS)
    start = time.perf_counter()
    dev = resolve_device(device)
    created = setup(dev, backend, timeout_min)
    comm = Comm.from_process_group(dev, profile=profile)
    out = Path(out_dir)
    temps: List[Tuple[Path, Path]] = []  # (temporary file, its final name), process 0
    try:
        with exit_on_sigterm():
            record, stages = _register(moving, fixed, out, preset, overrides, comm, outputs, suffix, margin, progress,
                                       temps, preset_name)
            comm.barrier()  # every process finished its part: the outputs are whole
            if comm.rank == 0:
                for tmp, final in temps:
                    tmp.replace(final)
                temps.clear()
                _write_extras(out, record, stages, outputs)
                record["seconds_total"] = time.perf_counter() - start
                if finish is not None:
                    finish(record)
                text = json.dumps(record, indent=1) + "\n"
                tmp = out / ".register.json.tmp"  # (removed at the start of a later run if left here)
                tmp.write_text(text)
                tmp.replace(out / "register.json")
            return record if comm.rank == 0 else None
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        cleanup(created)


def _write_extras(out: Path, record: Dict[str, Any], stages: Sequence[StageRecord], names: Sequence[str]) -> None:
    """Process 0, after the images: the affine as a world matrix and an ITK ``.tfm``, and the loss
    curves, as :func:`regkit.inference.register_files` writes them (each atomically)."""
    matrix = record.get("affine_matrix")
    if matrix is not None and "affine_files" in names:
        record["affine_files"] = {"world_matrix": str(write_matrix_txt(out / "affine.txt", np.asarray(matrix))),
                                  "itk": str(write_itk_tfm(out / "affine.tfm", np.asarray(matrix)))}
    if "loss_curve" in names and any(s.losses for s in stages) and plot_loss_curves(stages, out / "loss_curve.png") is not None:
        record["loss_curve"] = str(out / "loss_curve.png")


def _register(moving_path, fixed_path, out: Path, preset, overrides, comm: Comm, outputs, suffix, margin, progress,
              temps: List[Tuple[Path, Path]], preset_name: Optional[str]) -> Tuple[Dict[str, Any], List[StageRecord]]:
    pipe = _pipeline(preset, overrides, progress)
    stage = pipe.deformable
    moving, fixed = on_every_process(comm, lambda: (VolumeFile(moving_path), VolumeFile(fixed_path)), "opening the scans")
    shape = fixed.shape
    on_rank_zero(comm, lambda: _prepare_folder(out))
    seconds: Dict[str, float] = {}

    # 1. affine stage (process 0), 2. the moving scan on the fixed grid, by rows
    matrix, affine_result = None, None
    if pipe.affine is not None:
        t0 = time.perf_counter()
        affine_result = _run_affine(pipe, comm, moving, fixed)
        matrix = np.asarray(affine_result.matrix, np.float64)
        seconds["affine"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    same_grid = moving.shape == shape and np.allclose(moving.affine, fixed.affine, atol=1e-6)
    check_finite_file(moving, comm, "moving")
    fixed_rows = FileRows(fixed, comm.device)
    if same_grid and matrix is None:
        moving_rows: RowSource = FileRows(moving, comm.device)
    else:
        moving_rows = ResampledRows(moving, voxel_map(moving.affine, fixed.affine, matrix, 3), shape, comm.device)

    # 3. normalisation with global statistics, 4. the deformable stage on slabs
    fixed_n = NormalizedRows(fixed_rows, intensity_range(fixed_rows, comm, pipe.normalize, "fixed"))
    moving_n = NormalizedRows(moving_rows, intensity_range(moving_rows, comm, pipe.normalize, "moving"))
    result: SlabResult = stage.run(moving_n, fixed_n, comm, margin=margin)
    seconds[stage.name] = time.perf_counter() - t0

    # 5. outputs, each process its rows, process 0 streaming them into temporary files
    t0 = time.perf_counter()
    parts = split_rows(shape[-1], comm.world)
    lo, hi = result.rows
    u = whole_flow(result.flow, matrix, fixed.affine, shape, comm.device, (lo, hi))
    metrics: Dict[str, float] = {}
    arrays = _outputs(comm, u, result, moving, fixed, parts, outputs, metrics)
    header = fixed.header if fixed.path.name.endswith((".nii", ".nii.gz")) else None
    written = {}
    for name, (own, intent, description) in arrays.items():
        tmp, final = out / f".{name}.tmp{suffix}", out / f"{name}{suffix}"
        if comm.rank == 0:
            temps.append((tmp, final))
        write_nifti_rows(comm, tmp, own, parts, shape, fixed.affine, header, intent, description)
        written[name] = str(final)
        del own
    seconds_outputs = time.perf_counter() - t0
    comm_seconds = _gather_floats(comm, comm.seconds)
    stages = (affine_result.stages if affine_result else []) + result.stages
    if preset_name is None:
        preset_name = preset if isinstance(preset, str) else "custom"
    # the keys of regkit.inference.register_files's record, then the split's own
    record = {"checkpoint": None, "preset": preset_name, "pipeline": pipe.spec(), "moving": str(moving.path),
              "fixed": str(fixed.path), "moving_label": None, "fixed_label": None, "label_mode": None,
              "notes": ["the whole transformation (affine included) is flow_voxel/flow_mm"] if matrix is not None
              else [], "device": str(comm.device), **metrics,
              "stages": [s.to_dict() for s in stages], "seconds_per_stage": seconds,
              "affine_matrix": None if matrix is None else matrix.tolist(), "warnings": [],
              "outputs": written,
              "processes": comm.world, "backend": dist.get_backend() if comm.split else None,
              "overrides": dict(overrides or {}), "shape": list(shape), "rows": [list(p) for p in parts],
              "seconds_outputs": seconds_outputs, "comm_seconds": comm_seconds}
    return record, stages


def _gather_floats(comm: Comm, value: float) -> List[float]:
    t = torch.zeros(comm.world, dtype=torch.float64, device=comm.device)
    t[comm.rank] = value
    return comm.all_reduce_(t, "sum").tolist()


def split_jacobian_metrics(comm: Comm, det: Tensor) -> Dict[str, float]:
    """:func:`regkit.metrics.jacobian_metrics` over the whole grid from this process's rows of the
    Jacobian determinant (float64): the counts and the sums of ``log det J`` and of its squared
    deviation from the global mean (two passes, as there) summed over the processes."""
    det = det.reshape(-1)
    positive = det > 0
    logd = det[positive].log()
    sums = torch.stack([torch.tensor(float(det.numel()), dtype=torch.float64, device=det.device),
                        (det <= 0).sum().double(), positive.sum().double(), logd.sum()])
    n, nonpos, m, total = comm.all_reduce_(sums, "sum").tolist()
    mean = total / max(m, 1.0)
    var = float(comm.all_reduce_(((logd - mean) ** 2).sum().reshape(1), "sum")) / max(m, 1.0)
    return {"nonpos_jac_pct": 100 * nonpos / n if n > 0 else float("nan"),
            "sdlogj": math.sqrt(var) if m > 0 else float("nan")}


def _in_mm(field: Tensor, affine: np.ndarray) -> Tensor:
    """A voxel displacement ``(1, 3, ...)`` in mm, world RAS: ``A @ u`` per voxel with ``A`` the 3×3
    part of the affine, computed as :func:`regkit.inference.registration_outputs` computes it (NumPy,
    float64), so that the values are the same bit for bit."""
    u = field[0].double().cpu().permute(1, 2, 3, 0).numpy()
    mm = u @ np.asarray(affine, np.float64)[:3, :3].T
    return torch.from_numpy(np.ascontiguousarray(mm.transpose(3, 0, 1, 2), dtype=np.float32))[None]


def _outputs(comm: Comm, u: Tensor, result: SlabResult, moving: VolumeFile, fixed: VolumeFile,
             parts: Sequence[Tuple[int, int]], names: Sequence[str],
             metrics: Dict[str, float]) -> Dict[str, Tuple[Tensor, Optional[str], str]]:
    """This process's rows of every output: ``(tensor (1, C, ..., rows), intent, description)``;
    ``metrics`` gets the Jacobian metrics of the whole field (with ``jacdet``)."""
    shape = fixed.shape
    lo, hi = result.rows
    arrays: Dict[str, Tuple[Tensor, Optional[str], str]] = {}
    if "warped" in names:
        # warped = moving(inv(A_m) @ A_f @ (x + u(x))): one interpolation of the original scan
        pos = fixed_grid(shape, comm.device, (lo, hi)) + u.double()
        warped = sample_file(moving, transform_points(voxel_map(moving.affine, fixed.affine, None, 3), pos))
        arrays["warped"] = (warped, None, "warped moving image")
        del pos
    if "flow_voxel" in names:
        arrays["flow_voxel"] = (u, "vector", "displacement, voxels, axis k")
    if "flow_mm" in names:
        arrays["flow_mm"] = (_in_mm(u, fixed.affine), "vector", "displacement, mm, world RAS")
    if "jacdet" in names:
        # central differences need one row of each neighbour; float64 as in one process
        need = [(max(0, a - 1), min(shape[-1], b + 1)) for a, b in parts]
        region = comm.redistribute(u, lo, parts, need)
        det = jacobian_determinant(region.double())[:, None].narrow(-1, lo - need[comm.rank][0], hi - lo)
        del region
        metrics.update(split_jacobian_metrics(comm, det))
        arrays["jacdet"] = (det.float().contiguous(), None, "Jacobian determinant of x+u(x)")
        del det
    if result.inverse_flow is not None:
        if "inverse_flow_voxel" in names:
            arrays["inverse_flow_voxel"] = (result.inverse_flow.float(), "vector",
                                            "inverse of the deformable part, voxels")
        if "inverse_flow_mm" in names:
            arrays["inverse_flow_mm"] = (_in_mm(result.inverse_flow, fixed.affine), "vector",
                                         "inverse of the deformable part, mm RAS")
    return arrays
