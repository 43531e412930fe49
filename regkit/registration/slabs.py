"""One registration split into slabs along the last array axis, one slab per process.

The deformable engine (:mod:`regkit.registration.deformable`) runs every pyramid level on a
:class:`Slab`; a single process is the slab that is the whole grid (every helper here then calls
the plain whole-volume function, so its numbers are those of the unsplit code bit for bit), and
``torchrun --nproc_per_node=N`` gives N slabs that talk through ``torch.distributed`` (gloo on the
CPU, NCCL on GPUs; :class:`Comm`).

Geometry. A level grid of ``n`` voxels along its last axis is cut into contiguous ranges of rows,
one per process (:func:`split_rows`, sizes differing by at most one; each level is cut from its
own global shape). A process *owns* its rows and *holds* them plus ``halo`` rows on each side
(clipped at the faces of the volume). Why the last axis: NIfTI stores voxels in Fortran order, so
a range of the last axis is one contiguous block of the file.

Exactness (the owned rows come out as in one process, bit for bit with ``lncc_fast``, ``mse``,
``grad`` and ``folding``; docs/split_registration.md):

* every per-iteration quantity is computed on the held rows, with whatever is wrong near the
  held rows' edges (truncated windows, one-sided differences, replicated borders) confined to
  the halo; the halo is at least the dependency radius of one iteration
  (:meth:`~regkit.registration.deformable.DeformableRegistration.halo`), and after each update
  the halo rows are replaced by their owners' values (:meth:`Slab.refresh_halo`);
* the loss (:class:`SplitLoss`): each process sums the per-voxel terms of its held rows divided
  by the GLOBAL count, so the gradient at its owned rows is the single-process gradient; the
  value it reports sums its owned rows only, and the sum over processes is the global loss
  (added in another order: the reported values agree to round-off); ``lncc_fast`` is given the
  whole volume's minima as its shifts;
* global maxima (the longest update vector, the Lipschitz bound) are maxima over the owned
  voxels, then ``all_reduce(MAX)``: exact whatever the order;
* sampling and resampling (``grid_sample``, ``F.interpolate``) run on rows seen as the whole
  grid (:func:`whole_rows`) at global positions, so they round as on the whole grid: pyramid
  images (:func:`level_rows`) from the full-resolution rows they need, fields between levels
  from the owners' rows (:func:`field_rows`), the moving image (:class:`ImageRegion`, held on the
  rows its sampling positions ``x + u(x)`` reach, checked before every iteration and re-read
  wider when they come closer to its edge) and the field in each composition;
* the bending energy is evaluated on the held rows and rescaled (round-off, not bit for bit);
  ``lncc`` and ``lncc_group`` convolve the held rows (the convolution may round differently).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from regkit.device import synchronize
from regkit.errors import InputError, RegkitError
from regkit.losses.lncc import LNCCFast
from regkit.losses.regularizers import BendingEnergy, Folding, Grad
from regkit.losses.similarity import MSE
from regkit.registration.pyramid import downsample, spacing_ratios
from regkit.registration.result import StageRecord
from regkit.registration.smoothing import gaussian_smooth, kernel_radius
from regkit.spatial import identity_grid, jacobian_determinant, resize_flow, sample_at, warp

Rows = Tuple[int, int]
REDUCE_OPS = {"max": "MAX", "min": "MIN", "sum": "SUM"}


class SplitRunError(RegkitError, RuntimeError):
    """A communication call of a split registration failed: another process died, stopped
    answering within the process group's timeout, or left the group."""


def split_rows(n: int, parts: int, what: str = "the grid") -> List[Rows]:
    """``parts`` contiguous ranges ``[lo, hi)`` covering ``range(n)``, sizes differing by at most
    one (the first ``n % parts`` ranges one row longer)."""
    if parts < 1:
        raise InputError(f"need at least one process, got {parts}")
    if n < parts:
        raise InputError(f"{what} has {n} voxels along its last axis, fewer than the {parts} processes; "
                         f"use at most {n} processes (or a pyramid without that level)")
    base, extra = divmod(n, parts)
    out, lo = [], 0
    for r in range(parts):
        hi = lo + base + (1 if r < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def clip_rows(lo: int, hi: int, n: int) -> Rows:
    return max(0, lo), min(n, hi)


# -- the processes ------------------------------------------------------------------------------
class Comm:
    """The processes sharing one registration: rank, world size and the few collectives used.

    ``Comm.single(device)`` is one process (every call is a no-op or a local copy);
    ``Comm.from_process_group(device)`` uses torch.distributed's default group when one is
    initialised. ``seconds`` accumulates the time spent inside communication calls (waiting for
    the slowest process included); with ``profile=True`` the device is synchronised around each
    call so that CUDA timings are real (without it they are only the launch time on CUDA).
    """

    def __init__(self, device, rank: int = 0, world: int = 1, profile: bool = False) -> None:
        self.device = torch.device(device)
        self.rank, self.world = int(rank), int(world)
        self.profile = bool(profile)
        self.seconds = 0.0
        self.calls = 0
        self.bytes = 0

    @classmethod
    def single(cls, device) -> "Comm":
        return cls(device)

    @classmethod
    def from_process_group(cls, device, profile: bool = False) -> "Comm":
        if not (dist.is_available() and dist.is_initialized()):
            return cls(device, profile=profile)
        return cls(device, dist.get_rank(), dist.get_world_size(), profile)

    @property
    def split(self) -> bool:
        """More than one process."""
        return self.world > 1

    @contextmanager
    def timed(self) -> Iterator[None]:
        if self.profile:
            synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        except RuntimeError as exc:  # torch.distributed's errors (DistError and the backends') are RuntimeErrors
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise SplitRunError(f"process {self.rank} of {self.world}: communication with the other processes "
                                f"failed ({first}); another process died or stopped answering (its own output "
                                f"says why)") from None
        finally:
            if self.profile:
                synchronize(self.device)
            self.seconds += time.perf_counter() - start
            self.calls += 1

    def all_reduce_(self, t: Tensor, op: str) -> Tensor:
        """``t`` reduced over the processes in place (``max``, ``min`` or ``sum``); returns ``t``."""
        if self.world > 1:
            with self.timed():
                dist.all_reduce(t, op=getattr(dist.ReduceOp, REDUCE_OPS[op]))
        return t

    def redistribute(self, src: Tensor, src_lo: int, have: Sequence[Rows], want: Sequence[Rows],
                     out: Optional[Tensor] = None) -> Tensor:
        """Rows ``want[rank]`` of a tensor cut along its last axis, where process ``q`` provides its
        rows ``have[q]`` (the rows it owns, i.e. exact).

        ``src`` holds rows ``[src_lo, src_lo + src.shape[-1])`` of this process, covering
        ``have[rank]``. Every process calls this with the same ``have`` and ``want`` (each knows
        what the others want: the plans are functions of the partition). ``out`` (optional, rows
        ``want[rank]``): write into it; ``out is src`` refreshes the other rows in place."""
        r = self.rank
        w0, w1 = want[r]
        if self.world == 1 and out is None and (w0, w1) == (src_lo, src_lo + src.shape[-1]):
            return src
        in_place = out is src
        if in_place and w0 != src_lo:
            raise InputError(f"in-place redistribution needs want[{r}] to start at row {src_lo}, got {w0}")
        if out is None:
            out = src.new_empty(*src.shape[:-1], w1 - w0)
        ops, recvs = [], []
        for q in range(self.world):
            a, b = max(have[q][0], w0), min(have[q][1], w1)
            if a < b:
                if q == r:
                    if not in_place:
                        out[..., a - w0:b - w0].copy_(src[..., a - src_lo:b - src_lo])
                else:
                    buf = src.new_empty(*src.shape[:-1], b - a)
                    ops.append(dist.P2POp(dist.irecv, buf, q))
                    recvs.append((buf, a))
            if q != r:
                a, b = max(have[r][0], want[q][0]), min(have[r][1], want[q][1])
                if a < b:
                    ops.append(dist.P2POp(dist.isend, src[..., a - src_lo:b - src_lo].contiguous(), q))
        if ops:
            with self.timed():
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
            self.bytes += sum(op.tensor.numel() * op.tensor.element_size() for op in ops)
        for buf, a in recvs:
            out[..., a - w0:a - w0 + buf.shape[-1]].copy_(buf)
        return out

    def all_gather_cat(self, t: Tensor) -> Tensor:
        """The 1-D tensors of all processes, concatenated in rank order."""
        if self.world == 1:
            return t
        with self.timed():
            size = torch.tensor([t.numel()], device=t.device, dtype=torch.int64)
            sizes = [torch.empty_like(size) for _ in range(self.world)]
            dist.all_gather(sizes, size)
            sizes = [int(s) for s in sizes]
            padded = t.new_zeros(max(sizes))
            padded[:t.numel()] = t
            parts = [torch.empty_like(padded) for _ in range(self.world)]
            dist.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def broadcast_object(self, obj, src: int = 0):
        if self.world == 1:
            return obj
        box = [obj]
        with self.timed():
            dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            with self.timed():
                dist.barrier()


# -- one level's slab ---------------------------------------------------------------------------
@dataclass
class Slab:
    """This process's part of a level grid ``shape``: owned rows ``parts[rank]`` of the last axis,
    held rows = owned rows ± ``halo`` (clipped). Tensors of the level are ``(B, C, *shape[:-1],
    held rows)``; :meth:`own_view` narrows one to the owned rows."""

    shape: Tuple[int, ...]
    parts: List[Rows]
    halo: int
    comm: Comm

    @property
    def n(self) -> int:
        return int(self.shape[-1])

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def whole(self) -> bool:
        """One process: the slab is the whole grid."""
        return not self.comm.split

    def held_of(self, q: int) -> Rows:
        lo, hi = self.parts[q]
        return clip_rows(lo - self.halo, hi + self.halo, self.n)

    @property
    def own(self) -> Rows:
        return self.parts[self.rank]

    @property
    def held(self) -> Rows:
        return self.held_of(self.rank)

    def held_shape(self) -> Tuple[int, ...]:
        lo, hi = self.held
        return (*self.shape[:-1], hi - lo)

    def own_view(self, t: Tensor) -> Tensor:
        """``t`` (last axis = the held rows) narrowed to the owned rows."""
        (lo, hi), (hlo, _) = self.own, self.held
        return t.narrow(-1, lo - hlo, hi - lo)

    def padded(self, t: Tensor) -> Tensor:
        """``t`` (held rows) copied into a buffer that :func:`whole_rows` can show as the whole
        grid (for sampling it, :meth:`sample`); ``t`` itself on a whole slab."""
        return t if self.whole else padded_rows(t, self.held[0], self.n)

    def sample(self, u: Tensor, s: Tensor, padding_mode: str = "border") -> Tensor:
        """``u(x + s(x))`` over the held rows (``u`` made by :meth:`padded`): ``warp(u, s)`` as on the
        whole grid."""
        lo = self.held[0]
        return sample_rows(u, lo, self.n, s, lo, padding_mode)

    def refresh_halo(self, t: Tensor) -> Tensor:
        """Replace the halo rows of ``t`` (held rows, valid on the owned rows) by their owners'
        rows, in place; returns ``t``."""
        if self.whole:
            return t
        return self.comm.redistribute(t, self.held[0], self.parts, [self.held_of(q) for q in range(self.comm.world)],
                                      out=t)

    def lipschitz_bound(self, s: Tensor) -> Tensor:
        """:func:`regkit.registration.deformable.lipschitz_bound` of the whole field from this
        slab's held rows: per axis the largest squared forward difference over the pairs whose
        first voxel is owned (the last axis uses the first halo row), maxima over processes."""
        (lo, hi), (hlo, _) = self.own, self.held
        ndim = s.dim() - 2
        maxima = []
        for j in range(ndim):
            if j == ndim - 1:
                v = s.narrow(-1, lo - hlo, min(hi, self.n - 1) - lo + 1)
            else:
                v = s.narrow(-1, lo - hlo, hi - lo)
            m = v.shape[2 + j]
            if m < 2:
                maxima.append(s.new_zeros(()))
                continue
            diff = v.narrow(2 + j, 1, m - 1) - v.narrow(2 + j, 0, m - 1)
            maxima.append(diff.square().sum(1).amax())
        t = self.comm.all_reduce_(torch.stack(maxima), "max")
        total = s.new_zeros(())
        for j in range(ndim):  # the order of the single-process sum
            if self.shape[j] >= 2:
                total = total + t[j]
        return total.sqrt()


@dataclass
class SlabResult:
    """A deformable stage's output on this process: ``flow`` ``(1, ndim, *shape[:-1], hi - lo)``,
    the rows ``rows = (lo, hi)`` of the full-resolution field ``shape`` in voxels (the whole field
    for one process), ``inverse_flow`` likewise (or ``None``), and the stage records (the losses
    are the global ones, the same on every process)."""

    flow: Tensor
    rows: Rows
    shape: Tuple[int, ...]
    inverse_flow: Optional[Tensor] = None
    stages: List[StageRecord] = field(default_factory=list)


# -- volumes readable by rows ----------------------------------------------------------------------
class RowSource:
    """A volume ``(1, C, *shape)`` read by ranges of rows of its last axis: ``read(lo, hi)`` gives
    ``(1, C, *shape[:-1], hi - lo)`` on the registration's device. Subclasses read files slab by
    slab (:mod:`regkit.registration.distributed`); :class:`TensorRows` wraps a tensor."""

    shape: Tuple[int, ...]
    channels: int = 1
    dtype: torch.dtype = torch.float32

    def read(self, lo: int, hi: int) -> Tensor:
        raise NotImplementedError


class TensorRows(RowSource):
    """A tensor ``(1, C, *spatial)`` as a :class:`RowSource` (reads are views, not copies)."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor
        self.shape = tuple(int(s) for s in tensor.shape[2:])
        self.channels = int(tensor.shape[1])
        self.dtype = tensor.dtype

    def read(self, lo: int, hi: int) -> Tensor:
        return self.tensor.narrow(-1, lo, hi - lo)


# -- rows seen as the whole grid -------------------------------------------------------------------
def padded_rows(t: Tensor, lo: int, n: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A copy of ``t`` (rows ``[lo, lo + L)`` of a grid of ``n`` rows along its last axis) stored
    with ``lo`` elements before it and ``n - lo - L`` after, so that :func:`whole_rows` can show it
    as a tensor of ``n`` rows. Returns the copy (contiguous, ``t``'s shape, ``dtype`` if given)."""
    rows = t.shape[-1]
    buf = torch.empty(lo + t.numel() + (n - lo - rows), dtype=dtype or t.dtype, device=t.device)
    buf[:lo].zero_()
    buf[lo + t.numel():].zero_()
    data = buf[lo:lo + t.numel()].view(t.shape)
    data.copy_(t)
    return data


def whole_rows(t: Tensor, lo: int, n: int) -> Tensor:
    """``t`` (rows ``[lo, lo + L)``, made by :func:`padded_rows`) seen as ``n`` rows: row ``lo + i``
    of the view is row ``i`` of ``t``; the other rows alias neighbouring memory and must never be
    read. PyTorch's sampling and resampling kernels (``grid_sample``, ``F.interpolate``) then see
    the global size and global positions, so they round exactly as on the whole grid (normalised
    coordinates depend on the size), while holding only the rows; the last axis has stride 1, so
    the view costs ``n - L`` elements of padding."""
    rows = t.shape[-1]
    if rows == n and lo == 0:
        return t
    offset = t.storage_offset() - lo
    if not t.is_contiguous() or offset < 0 or offset + t.numel() + (n - rows) > t.untyped_storage().nbytes() // \
            t.element_size():
        raise InputError(f"whole_rows: the tensor {tuple(t.shape)} was not made by padded_rows for rows from {lo} of {n}")
    return t.as_strided((*t.shape[:-1], n), t.stride(), offset)


_GRIDS: Dict[Tuple, Tensor] = {}


def rows_grid(shape: Sequence[int], lo: int, device, dtype) -> Tensor:
    """Voxel positions ``(1, ndim, *shape)`` of rows ``lo..`` of a grid: the global positions
    (exact integers), as :func:`regkit.spatial.identity_grid` gives them for the whole grid."""
    if lo == 0:
        return identity_grid(shape, device, dtype)
    key = (tuple(shape), int(lo), torch.device(device), dtype)
    grid = _GRIDS.get(key)
    if grid is None:
        # built here rather than from identity_grid, whose cache would keep a second grid of the rows
        vectors = [torch.arange(n, device=device, dtype=dtype) for n in shape[:-1]]
        vectors.append(torch.arange(lo, lo + shape[-1], device=device, dtype=dtype))
        grid = torch.stack(torch.meshgrid(*vectors, indexing="ij")).unsqueeze(0)
        if len(_GRIDS) > 16:  # a few slabs per run
            _GRIDS.clear()
        _GRIDS[key] = grid
    return grid


def sample_rows(image: Tensor, image_lo: int, n: int, flow: Tensor, flow_lo: int,
                padding_mode: str = "zeros") -> Tensor:
    """``image(x + flow(x))`` (:func:`regkit.spatial.warp`) where ``flow`` holds rows from ``flow_lo``
    and ``image`` (made by :func:`padded_rows`) rows from ``image_lo`` of a grid of ``n`` rows
    (the other axes whole). Positions are global and the image is seen as the whole grid
    (:func:`whole_rows`), so the result is ``warp``'s on the whole grid, bit for bit; every
    sampled position must fall in the image's rows (or outside the grid)."""
    if image_lo == flow_lo == 0 and image.shape[-1] == flow.shape[-1] == n:
        return warp(image, flow, padding_mode=padding_mode)
    coords = rows_grid(flow.shape[2:], flow_lo, flow.device, flow.dtype) + flow
    return sample_at(whole_rows(image, image_lo, n), coords, "bilinear", padding_mode)


def source_rows(n_src: int, n_dst: int, rows: Rows) -> Rows:
    """The source rows ``[a, b)`` that linear resampling (``align_corners=True``) from ``n_src`` to
    ``n_dst`` samples reads for the destination ``rows``, plus one row on each side (the kernel
    computes positions in float32)."""
    ratio = (n_src - 1) / (n_dst - 1) if n_dst > 1 else 0.0
    lo, hi = rows
    return clip_rows(int(math.floor(lo * ratio)) - 1, int(math.floor((hi - 1) * ratio)) + 3, n_src)


def interpolate_rows(x: Tensor, x_lo: int, n: int, size: Sequence[int], rows: Rows) -> Tensor:
    """Rows ``rows`` of ``F.interpolate`` (linear, ``align_corners=True``) of a grid of ``n`` rows
    to ``size``, from its rows ``[x_lo, x_lo + L)`` in ``x`` (covering :func:`source_rows`): the
    kernel runs on the rows seen as the whole grid, so every value is the whole-grid one. It
    computes the whole destination grid, of which the rows are kept: one channel at a time, so
    the moment's memory is one channel of the destination grid."""
    mode = "bilinear" if len(size) == 2 else "trilinear"
    size = tuple(int(s) for s in size)
    out = x.new_empty(*x.shape[:2], *size[:-1], rows[1] - rows[0])
    for c in range(x.shape[1]):
        whole = F.interpolate(whole_rows(padded_rows(x[:, c:c + 1], x_lo, n), x_lo, n), size=size, mode=mode,
                              align_corners=True)
        out[:, c:c + 1] = whole[..., rows[0]:rows[1]]
        del whole
    return out


def level_rows(source: RowSource, shape: Sequence[int], rows: Rows, antialias: float, whole: bool) -> Tensor:
    """Rows ``rows`` of the pyramid level ``shape`` of ``source``: :func:`regkit.registration.
    pyramid.downsample` (Gaussian anti-aliasing, then ``F.interpolate``), from the full-resolution
    rows that the rows need plus the Gaussian's radius, with the same numbers as the whole
    volume's. ``whole``: ``downsample`` of the whole volume (one process)."""
    full = [int(s) for s in source.shape]
    shape = [int(s) for s in shape]
    if whole:
        return downsample(source.read(0, full[-1]), shape, antialias)
    if shape == full:
        return source.read(*rows)
    sigmas = [antialias * max(r - 1.0, 0.0) for r in spacing_ratios(full, shape)]
    a, b = source_rows(full[-1], shape[-1], rows)
    radius = kernel_radius(sigmas[-1])  # downsample smooths with gaussian_smooth's default truncate
    a, b = clip_rows(a - radius, b + radius, full[-1])
    x = source.read(a, b)
    if any(s > 0 for s in sigmas):
        x = gaussian_smooth(x, sigmas, padding="replicate")
    return interpolate_rows(x, a, full[-1], shape, rows)


def scale_field(u: Tensor, src_shape: Sequence[int], dst_shape: Sequence[int]) -> Tensor:
    """Displacement components rescaled from voxels of ``src_shape`` to voxels of ``dst_shape``
    (:func:`regkit.spatial.resize_flow`'s factors and arithmetic)."""
    if tuple(src_shape) == tuple(dst_shape):
        return u
    ndim = len(src_shape)
    factors = [(n - 1) / max(o - 1, 1) for n, o in zip(dst_shape, src_shape)]
    return u * torch.tensor(factors, device=u.device, dtype=u.dtype).view(1, ndim, *([1] * ndim))


def resize_rows(x: Tensor, x_lo: int, src_shape: Sequence[int], dst_shape: Sequence[int], rows: Rows) -> Tensor:
    """Rows ``rows`` of :func:`regkit.spatial.resize_flow` of a field on ``src_shape`` to
    ``dst_shape``, from its rows ``[x_lo, x_lo + L)`` in ``x``."""
    if tuple(src_shape) == tuple(dst_shape):
        return x[..., rows[0] - x_lo:rows[1] - x_lo]
    return scale_field(interpolate_rows(x, x_lo, int(src_shape[-1]), dst_shape, rows), src_shape, dst_shape)


def field_rows(comm: Comm, own: Tensor, src_shape: Sequence[int], src_parts: Sequence[Rows],
               dst_shape: Sequence[int], dst_rows: Sequence[Rows]) -> Tensor:
    """Rows ``dst_rows[rank]`` of a field resampled (:func:`regkit.spatial.resize_flow`) from the
    grid ``src_shape``, cut as ``src_parts`` (``own``: this process's rows), to ``dst_shape``. The
    source rows each process needs are fetched from their owners. One process: ``resize_flow``."""
    if not comm.split:
        return resize_flow(own, list(dst_shape))
    if tuple(src_shape) == tuple(dst_shape):
        need = list(dst_rows)
    else:
        need = [source_rows(int(src_shape[-1]), int(dst_shape[-1]), r) for r in dst_rows]
    region = comm.redistribute(own, src_parts[comm.rank][0], src_parts, need)
    return resize_rows(region, need[comm.rank][0], src_shape, dst_shape, dst_rows[comm.rank])


def source_field_rows(source: RowSource, dst_shape: Sequence[int], rows: Rows, whole: bool, dtype) -> Tensor:
    """Rows ``rows`` of a field read from ``source`` (full resolution) resampled to ``dst_shape``."""
    src_shape = source.shape
    if whole:
        return resize_flow(source.read(0, src_shape[-1]).to(dtype), list(dst_shape))
    if tuple(src_shape) == tuple(dst_shape):
        return source.read(*rows).to(dtype)
    a, b = source_rows(int(src_shape[-1]), int(dst_shape[-1]), rows)
    return resize_rows(source.read(a, b).to(dtype), a, src_shape, dst_shape, rows)


def reach(u: Tensor, lo: int) -> Tuple[float, float]:
    """Smallest and largest position ``x + u(x)`` along the last axis (global rows) over the rows
    ``u`` holds (from ``lo``). One host synchronisation."""
    z = torch.arange(lo, lo + u.shape[-1], device=u.device, dtype=u.dtype)
    low, high = torch.aminmax(u[:, -1] + z)
    return float(low), float(high)


class ImageRegion:
    """An image of one level held on the rows that a slab's sampling positions reach.

    Holds rows ``[lo, hi)``: the slab's held rows widened to the positions ``x + u(x)`` of the
    field at the start of the level, plus ``margin`` rows. :meth:`ensure` checks before each
    iteration that every position lies inside (or beyond a face of the volume, where sampling
    gives zeros as in one process) and otherwise re-reads a wider region (the margin doubled), so
    sampling never misses data. One process holds the whole image and checks nothing."""

    def __init__(self, source: RowSource, shape: Sequence[int], slab: Slab, antialias: float, dtype,
                 u: Optional[Tensor] = None, margin: int = 8, moves: bool = True) -> None:
        self.source, self.shape, self.slab = source, [int(s) for s in shape], slab
        self.antialias, self.dtype, self.margin, self.moves = antialias, dtype, int(margin), moves
        self.reads = 0
        lo, hi = slab.held
        if slab.whole:
            lo, hi = 0, slab.n
        elif moves and u is not None:
            low, high = reach(u, lo)
            lo, hi = min(lo, math.floor(low)), max(hi, math.ceil(high) + 1)
        if not slab.whole and moves:
            lo, hi = lo - self.margin, hi + self.margin
        self._load(*clip_rows(lo, hi, slab.n))

    def _load(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        rows = level_rows(self.source, self.shape, (lo, hi), self.antialias, self.slab.whole).to(self.dtype)
        # the rows in a padded buffer, so that sampling sees them as the whole grid (whole_rows)
        self.data = rows if self.slab.whole else padded_rows(rows, lo, self.slab.n)
        self.reads += 1

    def ensure(self, u: Tensor) -> None:
        """Widen the region when a position ``x + u(x)`` of the held rows falls outside it."""
        if self.slab.whole or (self.lo == 0 and self.hi == self.slab.n):
            return
        low, high = reach(u, self.slab.held[0])
        short_lo = self.lo > 0 and low < self.lo
        short_hi = self.hi < self.slab.n and high > self.hi - 1
        if short_lo or short_hi:
            self.margin *= 2
            lo = min(self.lo, math.floor(low)) - self.margin if short_lo else self.lo
            hi = max(self.hi, math.ceil(high) + 1) + self.margin if short_hi else self.hi
            self.data = None  # free the old rows before reading the new ones
            self._load(*clip_rows(lo, hi, self.slab.n))

    def held_rows(self) -> Tensor:
        """The image on the slab's held rows (a fixed image that does not move)."""
        lo, hi = self.slab.held
        return self.data[..., lo - self.lo:hi - self.lo]

    def sample(self, u: Tensor) -> Tensor:
        """The image at the positions ``x + u(x)`` of the slab's held rows."""
        return sample_rows(self.data, self.lo, self.slab.n, u, self.slab.held[0])


# -- inverse and composition on slabs -------------------------------------------------------------
def _reach_rows(comm: Comm, w: Tensor, parts: Sequence[Rows], n: int) -> List[Rows]:
    """Each process's owned rows widened by the largest ``|w|`` along the last axis (over all
    processes) plus 2 rows: the rows that sampling at ``x + w(x)`` needs."""
    m = comm.all_reduce_(w[:, -1].abs().amax().reshape(1), "max")
    margin = int(math.ceil(float(m))) + 2
    return [clip_rows(lo - margin, hi + margin, n) for lo, hi in parts]


@torch.no_grad()
def invert_rows(comm: Comm, own: Tensor, parts: Sequence[Rows], n: int, iterations: int) -> Tensor:
    """This process's rows of the inverse of ``x + u(x)`` (``u`` cut as ``parts`` along a last
    axis of ``n`` rows): the fixed point of ``w(y) = -u(y + w(y))``, iterated ``iterations``
    times from ``-u``. The iteration is pointwise in ``w``, so only ``u`` is fetched, with the
    margin its displacements reach. One process: the whole field, no communication."""
    lo = parts[comm.rank][0]
    need = _reach_rows(comm, own, parts, n)
    region = comm.redistribute(own, lo, parts, need)
    if comm.split:
        region = padded_rows(region, need[comm.rank][0], n)
    w = -own
    for _ in range(iterations):
        w = -sample_rows(region, need[comm.rank][0], n, w, lo, "border")
    return w


@torch.no_grad()
def compose_rows(comm: Comm, first: Tensor, second: Tensor, parts: Sequence[Rows], n: int) -> Tensor:
    """This process's rows of :func:`regkit.spatial.compose_flows` ``(first, second)``:
    ``second(x) + first(x + second(x))``, with the rows of ``first`` that ``second`` reaches."""
    lo = parts[comm.rank][0]
    need = _reach_rows(comm, second, parts, n)
    region = comm.redistribute(first, lo, parts, need)
    if comm.split:
        region = padded_rows(region, need[comm.rank][0], n)
    return second + sample_rows(region, need[comm.rank][0], n, second, lo, "border")


# -- the loss on a slab ---------------------------------------------------------------------------
def similarity_radius(term) -> Optional[int]:
    """How far (voxels) the gradient of a similarity at a voxel reaches: ``2 · (window // 2)`` for
    the LNCC family (a voxel's term sums its window; the gradient at a voxel sums the terms
    whose windows hold it), 0 for MSE; ``None`` for global losses (NCC, MI), which a split
    run refuses."""
    if hasattr(term, "voxel_cc") and hasattr(term, "window"):
        return 2 * (int(term.window) // 2)
    if isinstance(term, MSE):
        return 0
    return None


def regularizer_radius(term) -> Optional[int]:
    """Gradient reach (voxels) of a field regulariser: forward differences 1, the bending
    energy's second differences 2, the folding penalty's central-difference Jacobian 2;
    ``None`` for a term this module does not know."""
    if isinstance(term, Grad):
        return 1
    if isinstance(term, (BendingEnergy, Folding)):
        return 2
    return None


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


class SplitLoss:
    """``similarity(warped, target) + Σ weight · regulariser(field)`` of a slab.

    ``__call__(warped, target, fields, slab)`` returns ``(total, report)``: ``total`` is what
    autograd differentiates (its gradient at the owned rows is the whole-volume gradient),
    ``report`` (detached) this process's share of the whole-volume loss value (owned rows only;
    summed over processes it is the loss). On a whole slab both are the registry modules' own
    value, computed as the unsplit engine computes it."""

    def __init__(self, similarity, regularizers: Sequence[Tuple[str, float, object]]) -> None:
        self.similarity = similarity
        self.regularizers = list(regularizers)
        self.sim_radius = similarity_radius(similarity)
        radii = [regularizer_radius(term) for _, _, term in self.regularizers]
        self.reg_radius = None if any(r is None for r in radii) else max(radii, default=0)

    @property
    def radius(self) -> Optional[int]:
        """Gradient reach of the whole loss (voxels), ``None`` when a term is global."""
        if self.sim_radius is None or self.reg_radius is None:
            return None
        return max(self.sim_radius, self.reg_radius)

    def check_split(self, what: str) -> None:
        """One-line error for a loss a split run cannot compute exactly."""
        if self.sim_radius is None:
            raise InputError(f"{what}: the similarity {type(self.similarity).__name__} is a global statistic of the whole "
                             f"volume; a registration split over processes supports the local losses lncc_fast, "
                             f"lncc, lncc_group and mse")
        if self.reg_radius is None:
            names = [name for name, _, term in self.regularizers if regularizer_radius(term) is None]
            raise InputError(f"{what}: regulariser(s) {names} cannot be split over processes; supported: grad, "
                             f"bending, folding")

    def __call__(self, warped: Tensor, target: Tensor, fields: Sequence[Tensor], slab: Slab) -> Tuple[Tensor, Tensor]:
        if slab.whole:
            total = self.similarity(warped, target)
            for _, weight, term in self.regularizers:
                for u in fields:
                    total = total + weight * term(u)
            return total, total.detach()
        total, report = self._similarity(warped, target, slab)
        for _, weight, term in self.regularizers:
            for u in fields:
                t, r = self._regularizer(term, u, slab)
                total, report = total + weight * t, report + weight * r
        return total, report

    def _similarity(self, warped: Tensor, target: Tensor, slab: Slab) -> Tuple[Tensor, Tensor]:
        count = warped.shape[0] * warped.shape[1] * _prod(slab.shape)
        if hasattr(self.similarity, "voxel_cc"):
            shift = None
            if isinstance(self.similarity, LNCCFast):
                # lncc_fast shifts each image by its minimum before the window sums: the whole
                # volume's minimum (over the owned rows of all processes) rounds as one process does
                dims = tuple(range(2, warped.dim()))
                mins = torch.stack([slab.own_view(warped.detach()).amin(dim=dims), slab.own_view(target).amin(dim=dims)])
                slab.comm.all_reduce_(mins, "min")
                shift = [m.reshape(-1, *([1] * (warped.dim() - 1))) for m in mins]
            cc = self.similarity.voxel_cc(warped, target, shift)
            return -(cc.sum() / count), -(slab.own_view(cc.detach()).sum() / count)
        # MSE: mean((warped - fixed)²) as a sum over the held rows divided by the global count
        sq = (warped - target).pow(2)
        return sq.sum() / count, slab.own_view(sq.detach()).sum() / count

    def _regularizer(self, term, u: Tensor, slab: Slab) -> Tuple[Tensor, Tensor]:
        (lo, hi), (hlo, hhi) = slab.own, slab.held
        b, ndim = u.shape[0], u.dim() - 2
        if isinstance(term, Grad):
            # Grad: mean over axes of the mean squared (or absolute) forward difference
            total, report = u.new_zeros(()), u.new_zeros(())
            for j in range(ndim):
                sizes = list(slab.shape)
                sizes[j] -= 1
                count = b * ndim * _prod(sizes)
                m = u.shape[2 + j]
                d = u.narrow(2 + j, 1, m - 1) - u.narrow(2 + j, 0, m - 1)
                pen = d * d if term.penalty == "l2" else d.abs()
                total = total + pen.sum() / count
                # owned pairs: along the last axis those whose first voxel is owned
                length = (min(hi, slab.n - 1) - lo) if j == ndim - 1 else hi - lo
                if length > 0:
                    report = report + pen.detach().narrow(-1, lo - hlo, length).sum() / count
            return total / ndim, report / ndim
        if isinstance(term, BendingEnergy):
            # the module's mean over the interior voxels of the held rows, rescaled to the global
            # interior; the report evaluates it on the owned rows plus one row on each side
            interior = b * _prod(s - 2 for s in slab.shape)
            total = term(u) * (b * _prod(s - 2 for s in u.shape[2:]) / interior)
            a, z = max(lo - 1, hlo), min(hi + 1, hhi)
            with torch.no_grad():
                part = u.narrow(-1, a - hlo, z - a)
                report = (term(part) * (b * _prod(s - 2 for s in part.shape[2:]) / interior) if z - a >= 3
                          else u.new_zeros(()))
            return total, report
        if isinstance(term, Folding):
            count = b * _prod(slab.shape)
            penalty = torch.relu(term.margin - jacobian_determinant(u))
            return penalty.sum() / count, slab.own_view(penalty.detach()).sum() / count
        raise InputError(f"regulariser {type(term).__name__} cannot be split over processes")
