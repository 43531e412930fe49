"""One registration split into slabs over processes (regkit.registration.slabs, .distributed).

In process: each slab piece (pyramid rows, the split loss and its gradient, the quantile subset,
the streamed NIfTI writer) equals its whole-volume counterpart. Across gloo processes: two and
three processes give the single-process field, with thin slabs (fewer rows than the halo), odd
LNCC windows, the symmetric mode and every splittable regulariser; files in, files out; and a
process that dies ends the run with one line and no output files.
"""
from __future__ import annotations

import datetime
import gzip
import json
import os
import socket
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.distributed as dist
import multiprocessing

import torch.multiprocessing as mp

from regkit.data.io import load_volume, save_nifti
from regkit.errors import InputError
from regkit.inference import register_files, register_files_split
from regkit.registration.deformable import DeformableRegistration
from regkit.registration.distributed import (QUANTILE_VOXELS, NormalizedRows, intensity_range,
                                             register_volumes_distributed, strided_subset, write_nifti_rows)
from regkit.registration.pipeline import Pipeline, load_preset, normalize_intensity
from regkit.registration.result import AffineResult, StageRecord
from regkit.registration.pyramid import downsample, level_shape
from regkit.registration.slabs import (Comm, Slab, SplitLoss, TensorRows, level_rows, padded_rows, resize_rows,
                                       sample_rows, source_rows, split_rows, whole_rows)
from regkit.losses.registry import create_loss
from regkit.spatial import resize_flow, warp
from tests.conftest import ROOT
from tests.test_registration_deformable import known_pair, smooth_field

# With lncc_fast, mse, grad and folding a split run computes every owned voxel with the numbers of
# one process (bit for bit); the bending energy is evaluated on the held rows and rescaled, which
# rounds differently (float64 round-off, amplified a little by the iterations).
BENDING_TOL = 1e-9


def start(fn, args, nprocs):
    """``fn(rank, *args)`` in ``nprocs`` new processes (joined; a failure raises here). They fork
    from a server process that imported torch and regkit once (``forkserver``), not from this one
    (whose OpenMP threads a fork would copy mid-use): each start costs a fork, not an import
    (spawn where there is no forkserver)."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    multiprocessing.set_forkserver_preload([__name__])
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method=method)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalComm(Comm):
    """A rank of a ``world``-process cut without a process group: reductions return this rank's
    value (the tests make every rank's value the global one)."""

    def all_reduce_(self, t, op):
        return t


def fake_slabs(shape, world, halo):
    """One :class:`Slab` per rank of a ``world``-process cut, without a process group."""
    parts = split_rows(shape[-1], world)
    return [Slab(tuple(shape), parts, halo, LocalComm("cpu", rank=r, world=world)) for r in range(world)]


def held(t, slab):
    lo, hi = slab.held
    return t.narrow(-1, lo, hi - lo)


# -- pieces, in one process ------------------------------------------------------------------------
def test_split_rows_cut_evenly_and_refuse_more_processes_than_rows():
    assert split_rows(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_rows(5, 5) == [(i, i + 1) for i in range(5)]
    with pytest.raises(InputError, match="14 voxels along its last axis, fewer than the 16 processes"):
        split_rows(14, 16, "level 4")


@pytest.mark.parametrize("rows", [(0, 7), (5, 13), (11, 22), (0, 22)])
def test_pyramid_and_field_rows_are_the_rows_of_the_whole_level_bit_for_bit(rows):
    image = torch.rand(1, 1, 17, 19, 45)
    shape = level_shape(image.shape[2:], 2)  # 8 x 10 x 22: sigma 0.5-0.6, radius 2, non-integer ratios
    part = level_rows(TensorRows(image), shape, rows, 0.5, whole=False)
    assert torch.equal(part, downsample(image, shape, 0.5)[..., rows[0]:rows[1]])
    u = smooth_field((9, 10, 11), 2.0)
    want = (rows[0], min(rows[1], 21))
    a, b = source_rows(11, 21, want)
    assert torch.equal(resize_rows(u[..., a:b], a, (9, 10, 11), (17, 19, 21), want),
                       resize_flow(u, [17, 19, 21])[..., want[0]:want[1]])


def test_rows_seen_as_the_whole_grid_sample_as_the_whole_grid():
    """grid_sample on held rows (the kernel sees the global size and positions) gives warp's
    numbers on the whole grid, values and gradients, also at exact grid points (a zero field),
    where the interpolation's one-sided derivative depends on how the position rounds."""
    torch.manual_seed(0)
    image = torch.rand(1, 1, 12, 13, 40)
    u = 0.6 * torch.randn(1, 3, 12, 13, 40)
    u[..., 15:18] = 0
    lo, hi = 11, 30  # image rows held
    data = padded_rows(image[..., lo:hi], lo, 40)
    assert torch.equal(whole_rows(data, lo, 40)[..., lo:hi], image[..., lo:hi])
    full = u.clone().requires_grad_(True)
    part = u[..., 14:26].clone().requires_grad_(True)
    ref, got = warp(image, full)[..., 14:26], sample_rows(data, lo, 40, part, 14)
    assert torch.equal(got, ref)
    assert torch.equal(torch.autograd.grad(got.sum(), part)[0], torch.autograd.grad(ref.sum(), full)[0][..., 14:26])
    with pytest.raises(InputError, match="padded_rows"):
        whole_rows(image[..., lo:hi].contiguous(), lo, 40)


LOSSES = [("lncc_fast", {"window": 9}), ("lncc_fast", {"window": 7}), ("lncc", {"window": 5}),
          ("lncc_group", {"window": 3}), ("mse", {})]
REGULARIZERS = [("grad", {}), ("grad", {"penalty": "l1"}), ("bending", {}), ("folding", {"margin": 0.5})]


@pytest.mark.parametrize("loss,kwargs", LOSSES)
def test_split_loss_sums_to_the_whole_loss_and_gives_its_gradient_on_owned_rows(loss, kwargs):
    """Per slab: the reports sum to the whole loss, and the gradients (with respect to the warped
    image and the field) at the owned rows are the whole-volume gradients, with halos of exactly
    the loss's reach; one row less and they are not."""
    torch.manual_seed(0)
    shape = (12, 11, 23)
    warped = torch.rand(1, 1, *shape, dtype=torch.float64)
    fixed = torch.rand(1, 1, *shape, dtype=torch.float64)
    for lo, _ in split_rows(shape[-1], 3):  # each slab holds the global minimum (lncc_fast's shift)
        warped[..., 2, 3, lo] = fixed[..., 4, 1, lo] = 0
    warped.requires_grad_(True)
    u = (0.8 * smooth_field(shape, 1.0).double()).requires_grad_(True)
    regs = [(name, 0.3, create_loss(name, **kw)) for name, kw in REGULARIZERS]
    split = SplitLoss(create_loss(loss, **kwargs), regs)
    whole, _ = split(warped, fixed, [u], fake_slabs(shape, 1, 0)[0])
    grads = torch.autograd.grad(whole, (warped, u))

    def slab_grads(slab):
        w, f = held(warped.detach(), slab).requires_grad_(True), held(fixed, slab)
        uh = held(u.detach(), slab).requires_grad_(True)
        total, report = split(w, f, [uh], slab)
        return torch.autograd.grad(total, (w, uh)), report

    reports = []
    for slab in fake_slabs(shape, 3, split.radius):  # 8, 8, 7 rows: thinner than the window-9 halo
        g, report = slab_grads(slab)
        lo, hi = slab.own
        for mine, ref in zip(g, grads):
            torch.testing.assert_close(slab.own_view(mine), ref[..., lo:hi], rtol=1e-9, atol=1e-15)
        reports.append(report)
    assert float(sum(reports)) == pytest.approx(float(whole.detach()), rel=1e-12, abs=1e-14)
    g, _ = slab_grads(fake_slabs(shape, 3, split.radius - 1)[1])
    lo, hi = split_rows(shape[-1], 3)[1]
    assert max(float((fake_slabs(shape, 3, split.radius - 1)[1].own_view(mine) - ref[..., lo:hi]).abs().max())
               for mine, ref in zip(g, grads)) > 1e-9


def test_global_losses_and_too_many_processes_are_refused_in_one_line():
    moving, fixed, _ = known_pair((12, 12, 12), amplitude=1.0)
    for loss in ("ncc", "mi"):
        reg = DeformableRegistration(levels=(1,), iterations=1, loss=loss, progress=False)
        with pytest.raises(InputError, match="global statistic.*lncc_fast"):
            reg.run(TensorRows(moving), TensorRows(fixed), Comm("cpu", rank=0, world=2))
    reg = DeformableRegistration(levels=(4, 1), iterations=1, progress=False)
    with pytest.raises(InputError, match=r"level 4 \(8x8x8\) has 8 voxels along its last axis, fewer than the 9"):
        reg.run(TensorRows(moving), TensorRows(fixed), Comm("cpu", rank=0, world=9))


def test_quantile_subset_and_intensity_range_match_the_pipeline():
    x = torch.rand(1, 1, 160, 160, 170)  # above the quantile's 2**22 voxels: every second voxel
    step = x.numel() // QUANTILE_VOXELS + 1
    assert step == 2
    pieces = torch.cat([strided_subset(x[..., lo:hi], lo, 170, step) for lo, hi in split_rows(170, 3)])
    assert torch.equal(pieces.sort().values, x.reshape(-1)[::step].sort().values)
    value_range = intensity_range(TensorRows(x), Comm.single("cpu"), "percentile", "x")
    assert torch.equal(NormalizedRows(TensorRows(x), value_range).read(0, 170), normalize_intensity(x, "percentile", "x"))
    bad = x[..., :20].clone()
    bad[0, 0, 1, 2, 3] = float("nan")
    with pytest.raises(InputError, match="moving image has 1 NaN/inf voxels"):
        intensity_range(TensorRows(bad), Comm.single("cpu"), "minmax", "moving")
    with pytest.raises(InputError, match="constant"):
        intensity_range(TensorRows(torch.ones(1, 1, 4, 4, 4)), Comm.single("cpu"), "percentile", "fixed")


def test_streamed_nifti_has_the_bytes_of_save_nifti(tmp_path):
    fixed = tmp_path / "fixed.nii.gz"
    aff = np.array([[-1.0, 0, 0, 80], [0, 0, 1, -112], [0, -1, 0, 96], [0, 0, 0, 1]])
    save_nifti(fixed, np.random.rand(5, 6, 7).astype(np.float32), aff)
    header = load_volume(fixed).header
    u = torch.rand(1, 3, 5, 6, 7)
    write_nifti_rows(Comm.single("cpu"), tmp_path / "streamed.nii.gz", u, [(0, 7)], (5, 6, 7), aff, header,
                     "vector", "displacement, voxels, axis k")
    save_nifti(tmp_path / "ref.nii.gz", u[0].permute(1, 2, 3, 0).numpy()[:, :, :, None, :], aff, header=header,
               intent="vector", description="displacement, voxels, axis k")
    assert gzip.open(tmp_path / "streamed.nii.gz").read() == gzip.open(tmp_path / "ref.nii.gz").read()


# -- across processes (gloo on the CPU) --------------------------------------------------------------
CONFIGS = {
    # LNCC window 9 + diffusion, pyramid, inverse: halo 11 rows (2 + 8 + 1)
    "window9": dict(levels=(2, 1), iterations=(10, 5), loss_kwargs={"window": 9}, regularizers={"grad": 0.5},
                    inverse=True),
    # window 7, bending energy, both half-way fields and their inverses; 8-row slabs under a 9-row halo
    "window7_symmetric": dict(levels=(2, 1), iterations=(8, 4), loss_kwargs={"window": 7},
                              regularizers={"bending": 0.5}, symmetric=True, inverse=True),
    # pointwise loss, folding penalty, coarse levels only (the field is upsampled at the end): 2-row slabs
    "mse_coarse": dict(levels=(4, 2), iterations=(8, 6), loss="mse", regularizers={"folding": 1.0, "grad": 0.1}),
    # refinement of a given field (read by rows at the first level), stopping on the loss's progress
    "refine_tolerance": dict(levels=(2, 1), iterations=(30, 4), tolerance=0.05, patience=5),
}
SHAPE = (20, 18, 24)


def _init(name):
    return smooth_field(SHAPE, 1.0, seed=4).double() if name.startswith("refine") else None


def _pair():
    moving, fixed, _ = known_pair(SHAPE, amplitude=2.0)
    return moving.double(), fixed.double()


def _join(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))


def _split_worker(rank, world, port, names, out, file_runs):
    _join(rank, world, port)
    moving, fixed = _pair()
    for name in names:
        init = _init(name)
        res = DeformableRegistration(progress=False, **CONFIGS[name]).run(
            TensorRows(moving), TensorRows(fixed), Comm.from_process_group("cpu"),
            None if init is None else TensorRows(init))
        torch.save({"flow": res.flow, "inverse": res.inverse_flow, "rows": res.rows,
                    "losses": [s.losses for s in res.stages]}, f"{out}/{name}_{rank}.pt")
    for fn, args, kwargs in file_runs:
        {"volumes": register_volumes_distributed, "files": register_files_split}[fn](*args, **kwargs)
    dist.destroy_process_group()


def _check_against_one_process(names, world, out):
    moving, fixed = _pair()
    for name in names:
        ref = DeformableRegistration(progress=False, **CONFIGS[name])(moving, fixed, _init(name))
        if name == "refine_tolerance":  # the convergence test stopped the first level early, on every process
            assert ref.stages[0].iterations < 30
        parts = [torch.load(f"{out}/{name}_{r}.pt", weights_only=True) for r in range(world)]
        assert [p["rows"] for p in parts] == [tuple(r) for r in split_rows(SHAPE[-1], world)]
        tol = BENDING_TOL if "bending" in CONFIGS[name].get("regularizers", {}) else 0.0
        flow = torch.cat([p["flow"] for p in parts], -1)
        assert float((flow - ref.flow).abs().max()) <= tol, name
        if ref.inverse_flow is not None:
            inverse = torch.cat([p["inverse"] for p in parts], -1)
            assert float((inverse - ref.inverse_flow).abs().max()) <= tol, name
        for p in parts:  # every process reports the global loss of every iteration (summed in another order)
            for mine, single in zip(p["losses"], [s.losses for s in ref.stages]):
                assert mine == pytest.approx(single, rel=1e-10, abs=1e-12), name


def _write_pair(folder):
    """A small float32 pair on an LIA grid (the real data's orientation)."""
    moving, fixed, _ = known_pair(SHAPE, amplitude=2.0)
    aff = np.array([[-1.0, 0, 0, 10], [0, 0, 1, -12], [0, -1, 0, 9], [0, 0, 0, 1]])
    paths = folder / "moving.nii.gz", folder / "fixed.nii.gz"
    for path, image in zip(paths, (moving, fixed)):
        save_nifti(path, image[0, 0].numpy(), aff)
    return paths


CLI_RUN = dict(preset="accurate", preset_overrides={"deformable.iterations": [3, 2, 2]}, device="cpu", progress=False)
FILE_RUN = dict(preset="accurate", overrides={"affine": None, "deformable.iterations": [3, 2, 2]}, device="cpu",
                progress=False)
# a known world matrix: fixed world -> moving world, a shift of (1.5, -2, 0.75) mm
SHIFT = np.array([[1.0, 0, 0, 1.5], [0, 1, 0, -2.0], [0, 0, 1, 0.75], [0, 0, 0, 1]])


class ShiftAffine:
    """An affine stage that returns :data:`SHIFT` (the split run calls it on process 0 only)."""

    def register_volumes(self, moving, fixed):
        return AffineResult(matrix=SHIFT.copy(), stages=[StageRecord("affine", 1, list(fixed.data.shape), 0)])


def affine_pipeline():
    return Pipeline(affine=ShiftAffine(), deformable=DeformableRegistration(levels=(2, 1), iterations=(3, 2),
                                                                            inverse=True, progress=False),
                    device="cpu", progress=False)


def _write_moving_on_another_grid(folder):
    """The moving image of the pair on a grid of another size and origin (RAS, 1 mm)."""
    moving, _, _ = known_pair((22, 17, 27), amplitude=2.0, seed=3)
    aff = np.array([[1.0, 0, 0, -11], [0, 1, 0, -9], [0, 0, 1, -12], [0, 0, 0, 1]])
    path = folder / "moving_other_grid.nii"
    save_nifti(path, moving[0, 0].numpy(), aff)
    return path


def test_two_processes_give_the_single_process_field_and_files(tmp_path):
    paths = _write_pair(tmp_path)
    other = _write_moving_on_another_grid(tmp_path)
    runs = [("volumes", (*paths, tmp_path / "two"), FILE_RUN),
            ("volumes", (other, paths[1], tmp_path / "two_affine"),
             dict(preset=affine_pipeline(), device="cpu", progress=False)),
            # what regkit-register runs under torchrun: the preset's own affine stage included
            ("files", (None, other, paths[1], tmp_path / "two_cli"), CLI_RUN)]
    start(_split_worker, (2, free_port(), ["window9"], str(tmp_path), runs), 2)
    _check_against_one_process(["window9"], 2, tmp_path)

    # an affine stage (process 0) and a moving scan on another grid, resampled by rows
    one = register_volumes_distributed(other, paths[1], tmp_path / "one_affine", preset=affine_pipeline(),
                                       device="cpu", progress=False)
    two = json.loads((tmp_path / "two_affine" / "register.json").read_text())
    assert one["affine_matrix"] == two["affine_matrix"] == SHIFT.tolist() and two["stages"][0]["name"] == "affine"
    for name in ("flow_voxel", "warped", "inverse_flow_voxel", "inverse_flow_mm"):
        a, b = (np.asarray(nib.load(tmp_path / d / f"{name}.nii.gz").dataobj) for d in ("one_affine", "two_affine"))
        assert np.array_equal(a, b), name
    ref = affine_pipeline().register(load_volume(other), load_volume(paths[1]))
    flow = np.asarray(nib.load(tmp_path / "one_affine" / "flow_voxel.nii.gz").dataobj)[:, :, :, 0]
    assert np.array_equal(flow, ref.flow[0].permute(1, 2, 3, 0).numpy())

    one = register_volumes_distributed(*paths, tmp_path / "one", **FILE_RUN)
    two = json.loads((tmp_path / "two" / "register.json").read_text())
    assert one["processes"] == 1 and two["processes"] == 2 and two["rows"] == [[0, 12], [12, 24]]
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())  # no temporary files left either
    images = ["flow_mm.nii.gz", "flow_voxel.nii.gz", "inverse_flow_mm.nii.gz", "inverse_flow_voxel.nii.gz",
              "jacdet.nii.gz", "warped.nii.gz"]
    assert names == sorted([*images, "loss_curve.png", "register.json"])
    fixed = load_volume(paths[1])
    for name in images:
        a, b = nib.load(tmp_path / "one" / name), nib.load(tmp_path / "two" / name)
        assert a.header.binaryblock == b.header.binaryblock, name
        np.testing.assert_allclose(a.affine, fixed.affine)
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)), name  # float32, bit for bit
    assert [s["loss_final"] for s in one["stages"][:3]] == pytest.approx([s["loss_final"] for s in two["stages"][:3]],
                                                                        rel=1e-5)
    # one process through the files is the pipeline itself, bit for bit
    pipe = load_preset("accurate", affine=None, progress=False, device="cpu", **{"deformable.iterations": [3, 2, 2]})
    ref = pipe.register(load_volume(paths[0]), fixed)
    flow = np.asarray(nib.load(tmp_path / "one" / "flow_voxel.nii.gz").dataobj)[:, :, :, 0]
    assert np.array_equal(flow, ref.flow[0].permute(1, 2, 3, 0).numpy())

    # two processes write the files regkit-register writes in one process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process of the split run
    try:
        register_files(None, other, paths[1], tmp_path / "one_cli", preset=CLI_RUN["preset"], device="cpu",
                       progress=False, preset_overrides=CLI_RUN["preset_overrides"])
    finally:
        torch.set_num_threads(threads)
    same_outputs(tmp_path / "one_cli", tmp_path / "two_cli", [[0, 12], [12, 24]])


def same_outputs(one, two, rows):
    """The split run (folder ``two``) wrote the files of ``regkit-register`` in one process (``one``):
    the same names, NIfTI headers byte for byte, the same values (float32, bit for bit), the same
    affine files, and register.json with the same keys (and the split's own)."""
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())  # no temporary file left either
    assert names == sorted(["warped.nii.gz", "flow_voxel.nii.gz", "flow_mm.nii.gz", "jacdet.nii.gz",
                            "inverse_flow_voxel.nii.gz", "inverse_flow_mm.nii.gz", "affine.txt", "affine.tfm",
                            "loss_curve.png", "register.json"])
    for name in names:
        if name.endswith(".nii.gz"):
            a, b = nib.load(str(one / name)), nib.load(str(two / name))
            assert a.header.binaryblock == b.header.binaryblock, name
            da, db = np.asarray(a.dataobj), np.asarray(b.dataobj)
            assert da.dtype == db.dtype == np.float32 and np.array_equal(da, db), (name, np.abs(da - db).max())
        elif name.startswith("affine"):
            assert (one / name).read_text() == (two / name).read_text(), name
    r1, r2 = (json.loads((d / "register.json").read_text()) for d in (one, two))
    assert set(r1) <= set(r2) and r2["processes"] == 2 and r2["rows"] == rows
    assert r1["affine_matrix"] == r2["affine_matrix"] and r1["pipeline"] == r2["pipeline"]
    assert r1["preset"] == r2["preset"] and r1["notes"] == r2["notes"] and r1["warnings"] == r2["warnings"]
    assert r2["nonpos_jac_pct"] == r1["nonpos_jac_pct"] and r2["sdlogj"] == pytest.approx(r1["sdlogj"], rel=1e-12)
    # the loss of each iteration is summed over the processes in another order: float32 round-off
    assert [(s["name"], s["level"]) for s in r1["stages"]] == [(s["name"], s["level"]) for s in r2["stages"]]
    for s1, s2 in zip(r1["stages"], r2["stages"]):
        for key in ("loss_first", "loss_final"):
            assert s2[key] == (None if s1[key] is None else pytest.approx(s1[key], rel=1e-5)), (s1, key)


def test_three_thin_slabs_give_the_single_process_field(tmp_path):
    names = ["window7_symmetric", "mse_coarse", "refine_tolerance"]
    start(_split_worker, (3, free_port(), names, str(tmp_path), []), 3)
    _check_against_one_process(names, 3, tmp_path)


DYING = """
import os, sys
from regkit.registration import deformable
if os.environ["RANK"] == "1":
    update, calls = deformable.GreedyOptimizer.update, []
    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os._exit(3)  # a process that dies mid-run (killed, out of memory, ...)
        return update(self, *args, **kwargs)
    deformable.GreedyOptimizer.update = dying
from regkit.cli import register
sys.exit(register.main(sys.argv[1:]))
"""


def test_a_process_that_dies_stops_the_others_with_one_line_and_no_outputs(tmp_path):
    paths = _write_pair(tmp_path)
    out = tmp_path / "out"
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-c", DYING, *map(str, paths), "-o", str(out), "--affine", "none", "--set",
               "deformable.iterations=[6,4,3]", "--device", "cpu", "--timeout-min", "1"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results = [p.communicate(timeout=240) for p in procs]
    assert procs[1].returncode == 3
    assert procs[0].returncode == 2, results[0]
    lines = [line for line in results[0][1].splitlines() if line.startswith("regkit: error:")]
    assert len(lines) == 1 and "process 0 of 2: communication with the other processes failed" in lines[0]
    assert results[1][0] == "" and "regkit: error" not in results[1][1]  # the dying process printed nothing
    assert not out.exists() or list(out.iterdir()) == []  # nothing written, no temporary file left
