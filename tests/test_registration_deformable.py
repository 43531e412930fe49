"""Deformable registration, refinement, smoothing, pyramid and the pipeline (regkit.registration)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from regkit.errors import InputError
from regkit.registration.deformable import DeformableRegistration, GreedyOptimizer, invert_flow, lipschitz_bound
from regkit.spatial import sample_at
from regkit.registration.pipeline import (Pipeline, load_preset, plot_loss_curves, voxel_map,
                                          whole_flow)
from regkit.registration.pyramid import level_shape
from regkit.registration.refine import Refine
from regkit.registration.result import AffineResult, StageRecord
from regkit.registration.smoothing import gaussian_kernel1d, gaussian_smooth
from regkit.spatial import identity_grid, jacobian_determinant, warp


# -- synthetic pairs with a known transformation ---------------------------------------------------
def blobs(points: torch.Tensor, seed: int = 0, n: int = 80) -> torch.Tensor:
    """A smooth textured image evaluated analytically at voxel positions ``(ndim, *shape)``:
    a sum of Gaussian blobs (sigma 1.5-3 voxels) filling a box of 32 voxels per axis."""
    g = torch.Generator().manual_seed(seed)
    ndim = points.shape[0]
    centres = -2 + 36 * torch.rand(n, ndim, generator=g, dtype=torch.float64)
    sigmas = 1.5 + 1.5 * torch.rand(n, generator=g, dtype=torch.float64)
    weights = 0.4 + 0.6 * torch.rand(n, generator=g, dtype=torch.float64)
    out = torch.zeros(points.shape[1:], dtype=torch.float64)
    for c, s, w in zip(centres, sigmas, weights):
        d2 = sum((points[k] - c[k]) ** 2 for k in range(ndim))
        out = out + w * torch.exp(-d2 / (2 * s * s))
    return out


def smooth_field(shape, amplitude: float, seed: int = 1) -> torch.Tensor:
    """A smooth displacement ``(1, ndim, *shape)`` (voxels): each component a product of sines of
    wavelength 32 voxels with random phases, scaled to ``amplitude`` voxels at most."""
    g = torch.Generator().manual_seed(seed)
    ndim = len(shape)
    x = identity_grid(shape, dtype=torch.float64)[0]
    comps = []
    for _ in range(ndim):
        phase = 2 * math.pi * torch.rand(ndim, generator=g, dtype=torch.float64)
        c = torch.ones(shape, dtype=torch.float64)
        for j in range(ndim):
            c = c * torch.sin(2 * math.pi * x[j] / 32 + phase[j])
        comps.append(amplitude * c)
    return torch.stack(comps)[None]


def known_pair(shape, amplitude: float, seed: int = 0):
    """``(moving, fixed, u_true)`` with ``fixed(x) = moving(x + u_true(x))`` exactly (both images
    evaluated analytically, no interpolation)."""
    x = identity_grid(shape, dtype=torch.float64)[0]
    u = smooth_field(shape, amplitude, seed + 1)
    moving = blobs(x, seed)[None, None].float()
    fixed = blobs(x + u[0], seed)[None, None].float()
    return moving, fixed, u.float()


def quick(levels=(2, 1), iterations=(60, 40), **kw) -> DeformableRegistration:
    return DeformableRegistration(levels=levels, iterations=iterations, progress=False, **kw)


def interior(t: torch.Tensor, r: int = 4) -> torch.Tensor:
    return t[(slice(None), slice(None)) + tuple(slice(r, s - r) for s in t.shape[2:])]


# -- smoothing and pyramid ------------------------------------------------------------------------
@pytest.mark.parametrize("ndim", [2, 3])
def test_gaussian_smooth_equals_convolution_with_the_outer_product_kernel(ndim):
    x = torch.rand(2, 3, *([13] * ndim), dtype=torch.float64)
    sig = [1.3, 0.7, 2.0][:ndim]
    ks = [gaussian_kernel1d(s, 3.0, dtype=torch.float64) for s in sig]
    kernel = ks[0]
    for k in ks[1:]:
        kernel = kernel[..., None] * k.view(*([1] * (kernel.dim())), -1).squeeze(0)
    assert kernel.shape == tuple(len(k) for k in ks)
    conv = F.conv2d if ndim == 2 else F.conv3d
    w = kernel[None, None].expand(3, 1, *kernel.shape)
    ref = conv(x, w, padding=[len(k) // 2 for k in ks], groups=3)
    got = gaussian_smooth(x, sig, padding="zeros")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-14)
    # replicate padding = the convolution of the edge-extended input
    pads = []
    for k in reversed(ks):
        pads += [len(k) // 2] * 2
    ref_rep = conv(F.pad(x, pads, mode="replicate"), w, groups=3)
    torch.testing.assert_close(gaussian_smooth(x, sig), ref_rep, rtol=0, atol=1e-14)
    # axes shorter than the kernel (replicate padding repeats the edge many times)
    tiny = torch.rand(1, 2, *([3] * ndim), dtype=torch.float64)
    k = gaussian_kernel1d(2.0, 3.0, dtype=torch.float64)
    r = len(k) // 2
    wk = k
    for _ in range(ndim - 1):
        wk = wk[..., None] * k
    ref_tiny = conv(F.pad(tiny, [r] * (2 * ndim), mode="replicate"), wk[None, None].expand(2, 1, *wk.shape), groups=2)
    torch.testing.assert_close(gaussian_smooth(tiny, 2.0), ref_tiny, rtol=0, atol=1e-14)


def test_gaussian_kernel_is_normalised_and_constant_fields_are_kept():
    k = gaussian_kernel1d(1.7)
    assert abs(float(k.sum()) - 1) < 1e-6 and len(k) == 2 * math.ceil(3 * 1.7) + 1
    c = torch.full((1, 3, 9, 10, 11), 2.5)
    torch.testing.assert_close(gaussian_smooth(c, 1.5), c)
    assert torch.equal(gaussian_smooth(c, 0.0), c)
    with pytest.raises(InputError, match="sigma"):
        gaussian_kernel1d(-1.0)


def test_level_shapes():
    assert level_shape([160, 192, 224], 4) == [40, 48, 56]
    assert level_shape([160, 192, 224], 1) == [160, 192, 224]
    assert level_shape([6, 40], 4) == [6, 10]  # small axes are not shrunk below 8 voxels
    with pytest.raises(InputError, match=">= 1"):
        level_shape([10, 10], 0.5)


# -- recovery of known transformations ---------------------------------------------------------------
def test_known_smooth_diffeomorphism_is_recovered_3d():
    moving, fixed, u_true = known_pair((32, 32, 32), amplitude=2.0)
    before = interior(warp(moving, torch.zeros_like(u_true)) - fixed).abs().mean()
    res = quick()(moving, fixed)
    warped = warp(moving, res.flow)
    after = interior(warped - fixed).abs().mean()
    assert after < 0.2 * before
    err = interior(res.flow - u_true).norm(dim=1).mean()
    size = interior(u_true).norm(dim=1).mean()
    assert err < 0.4 * size, (float(err), float(size))
    # records: one per level, with a loss per iteration that went down
    assert [r.level for r in res.stages] == [2, 1]
    assert [r.iterations for r in res.stages] == [60, 40]
    assert all(len(r.losses) == r.iterations for r in res.stages)
    assert res.stages[0].losses[-1] < res.stages[0].losses[0]


def test_2d_registration_recovers_the_field():
    moving, fixed, u_true = known_pair((32, 32), amplitude=2.0, seed=3)
    res = quick(iterations=(80, 60))(moving, fixed)
    assert res.flow.shape == (1, 2, 32, 32)
    err = interior(res.flow - u_true).norm(dim=1).mean()
    assert err < 0.4 * interior(u_true).norm(dim=1).mean()


def test_large_deformation_has_no_folding():
    moving, fixed, u_true = known_pair((32, 32, 32), amplitude=4.0, seed=5)
    assert u_true.abs().max() > 3.9
    res = quick(levels=(4, 2, 1), iterations=(80, 60, 30), step=0.5)(moving, fixed)
    det = jacobian_determinant(res.flow)
    assert float(det.min()) > 0
    assert res.flow.abs().max() > 2.0  # it did deform substantially


def test_inverse_field_inverts_the_forward_field():
    moving, fixed, _ = known_pair((32, 32, 32), amplitude=2.0)
    res = quick(inverse=True)(moving, fixed)
    # x + u(x) then + w: back to x (inside, away from the border)
    roundtrip = res.flow + warp(res.inverse_flow, res.flow, padding_mode="border")
    assert interior(roundtrip).norm(dim=1).mean() < 0.05 * interior(res.flow).norm(dim=1).mean()
    assert interior(roundtrip).norm(dim=1).max() < 0.3
    assert res.stages[-1].name == "deformable-inverse"


def test_symmetric_mode_recovers_the_field_and_its_inverse():
    moving, fixed, u_true = known_pair((32, 32, 32), amplitude=2.0)
    res = quick(symmetric=True, inverse=True)(moving, fixed)
    err = interior(res.flow - u_true).norm(dim=1).mean()
    assert err < 0.4 * interior(u_true).norm(dim=1).mean()
    roundtrip = res.flow + warp(res.inverse_flow, res.flow, padding_mode="border")
    assert interior(roundtrip).norm(dim=1).mean() < 0.05 * interior(res.flow).norm(dim=1).mean()
    assert float(jacobian_determinant(res.flow).min()) > 0
    assert res.stages[-1].name == "deformable-compose" and res.stages[0].extra["symmetric"]


def test_updates_are_capped_below_lipschitz_one():
    # a wild start (huge gradients in a tiny image) would otherwise give a folding update
    s = torch.zeros(1, 3, 6, 6, 6)
    s[0, 0, 3] = 0.45
    s[0, 0, 2] = -0.45
    assert float(lipschitz_bound(s)) == pytest.approx(0.9, abs=1e-6)
    opt = GreedyOptimizer(s.shape, s, step=0.9, grad_sigma=0.0, field_sigma=0.0, beta1=0.0, beta2=0.0,
                          max_jacobian=0.5)
    new = opt.update(torch.zeros_like(s), -s)  # the update is along +s, scaled to 0.9 voxel then capped
    assert float(lipschitz_bound(new)) == pytest.approx(0.5, rel=1e-5)
    assert int(opt.capped) == 1
    with pytest.raises(InputError, match="max_jacobian"):
        DeformableRegistration(max_jacobian=1.0)


def test_invert_flow_of_a_translation_is_exact():
    u = torch.full((1, 3, 8, 9, 10), 0.75)
    u[:, 1] = -0.5
    w = invert_flow(u, iterations=3)
    torch.testing.assert_close(w, -u)


def test_refine_from_a_perturbed_true_field_gets_closer():
    moving, fixed, u_true = known_pair((32, 32, 32), amplitude=2.0, seed=7)
    noise = smooth_field((32, 32, 32), 0.8, seed=11)
    start = u_true + noise
    res = Refine(iterations=40, progress=False)(moving, fixed, init_flow=start)
    err_start = interior(start - u_true).norm(dim=1).mean()
    err_end = interior(res.flow - u_true).norm(dim=1).mean()
    assert err_end < 0.8 * err_start, (float(err_start), float(err_end))
    assert res.stages[0].name == "refine" and res.stages[0].level == 1
    with pytest.raises(InputError, match="init_flow"):
        Refine(iterations=1, progress=False)(moving, fixed)


def test_regularizers_from_the_registry_are_used():
    moving, fixed, _ = known_pair((24, 24, 24), amplitude=2.0)
    plain = quick(iterations=(20, 10))(moving, fixed)
    heavy = quick(iterations=(20, 10), regularizers={"grad": 50.0})(moving, fixed)
    first = plain.stages[0].losses[0], heavy.stages[0].losses[0]
    assert first[0] == pytest.approx(first[1])  # the identity start: the regulariser is 0
    assert heavy.flow.abs().mean() < plain.flow.abs().mean()


# -- bad input -------------------------------------------------------------------------------------
def test_bad_inputs_get_one_line_errors():
    reg = quick(iterations=(1, 1))
    m = torch.rand(1, 1, 16, 16, 16)
    nan = m.clone()
    nan[0, 0, 3, 3, 3] = float("nan")
    cases = [
        ((nan, m), "moving image has 1 NaN"),
        ((m, torch.full_like(m, float("nan"))), "fixed image has 4096 NaN"),
        ((m, torch.rand(1, 1, 16, 16, 17)), "same grid"),
        ((torch.rand(1, 1, 16, 16), m), "2-D"),
    ]
    for args, msg in cases:
        with pytest.raises(InputError, match=msg) as info:
            reg(*args)
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="initial flow"):
        reg(m, m, init_flow=torch.zeros(1, 3, 8, 8, 8))
    with pytest.raises(InputError, match="Unknown loss 'lncc_fats'. Did you mean 'lncc_fast'"):
        DeformableRegistration(loss="lncc_fats")
    with pytest.raises(InputError, match="Unknown loss"):
        DeformableRegistration(regularizers={"smooth": 1.0})
    with pytest.raises(InputError, match="not an image similarity"):
        DeformableRegistration(loss="grad")
    with pytest.raises(InputError, match="one value per pyramid level"):
        DeformableRegistration(levels=(4, 2, 1), iterations=(10, 10))
    with pytest.raises(InputError, match=r"step must lie in \(0, 1\)"):
        DeformableRegistration(step=1.5)
    with pytest.raises(InputError, match="Unknown registration preset 'acurate'. Did you mean 'accurate'"):
        load_preset("acurate")


# -- the pipeline ----------------------------------------------------------------------------------
class FixedAffine:
    """A stand-in affine stage that returns a known world matrix."""

    def __init__(self, matrix):
        self.matrix = np.asarray(matrix, np.float64)

    def __call__(self, moving, fixed):
        return AffineResult(matrix=self.matrix, stages=[StageRecord("affine", 1, list(fixed.data.shape), 0)])


def rotation_matrix(deg: float, shift) -> np.ndarray:
    a = math.radians(deg)
    t = np.eye(4)
    t[:3, :3] = [[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]]
    t[:3, 3] = shift
    return t


def test_whole_flow_composes_the_affine_and_the_deformable_parts():
    shape = (20, 22, 24)
    a_f = np.diag([-1.5, 1.2, 1.0, 1.0])
    a_f[:3, 3] = [10, -5, 3]
    t = rotation_matrix(7, [2.0, -1.0, 0.5])
    d = smooth_field(shape, 1.5).double()
    u = whole_flow(d, t, a_f, shape).double()
    x = identity_grid(shape, dtype=torch.float64)
    # A_f (x + u) == T A_f (x + d), point by point
    lhs = np.einsum("ij,j...->i...", a_f[:3, :3], (x + u)[0].numpy()) + a_f[:3, 3, None, None, None]
    q = (x + d)[0].numpy()
    rhs = np.einsum("ij,j...->i...", (t @ a_f)[:3, :3], q) + (t @ a_f)[:3, 3, None, None, None]
    np.testing.assert_allclose(lhs, rhs, atol=1e-4)  # float32 output of positions ~ 30 mm
    assert torch.equal(whole_flow(None, None, a_f, shape), torch.zeros(1, 3, *shape))


def test_pipeline_warped_image_is_the_moving_scan_sampled_through_the_whole_field():
    shape = (24, 24, 24)
    moving, fixed, _ = known_pair(shape, amplitude=1.5)
    a_m = np.diag([1.0, 1.0, 1.0, 1.0])
    a_f = np.eye(4)
    a_f[:3, 3] = [0.5, -0.5, 0.0]
    t = rotation_matrix(3, [0.3, 0.2, -0.4])
    pipe = Pipeline(affine=FixedAffine(t), deformable=quick(iterations=(10, 5)), normalize="none", device="cpu",
                    progress=False)
    res = pipe.register((moving[0, 0].numpy(), a_m), (fixed[0, 0].numpy(), a_f))
    assert [s.name for s in res.stages] == ["affine", "deformable", "deformable"]
    assert set(res.seconds) == {"affine", "deformable"}
    # the whole field, sampled in the moving scan's voxels, reproduces `warped`
    pos = identity_grid(shape, dtype=torch.float64) + res.flow.double()
    vox = voxel_map(a_m, a_f, None, 3)
    coords = torch.einsum("ij,bj...->bi...", torch.from_numpy(vox[:3, :3]), pos) + torch.from_numpy(
        vox[:3, 3]).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(res.warped, sample_at(moving, coords), atol=1e-5, rtol=0)
    # ... and equals resampling through T, then warping by the deformable part (two interpolations)
    m_aff = sample_at(moving, torch.einsum("ij,bj...->bi...", torch.from_numpy(voxel_map(a_m, a_f, t, 3)[:3, :3]),
                                           identity_grid(shape, dtype=torch.float64))
                      + torch.from_numpy(voxel_map(a_m, a_f, t, 3)[:3, 3]).view(1, 3, 1, 1, 1))
    two_step = warp(m_aff, res.deformable.flow)
    assert interior(res.warped - two_step).abs().mean() < 0.05 * interior(fixed).abs().mean()


def test_pipeline_checks_its_inputs():
    pipe = Pipeline(deformable=quick(iterations=(1, 1)), progress=False, device="cpu")
    m = np.random.rand(16, 16, 16).astype(np.float32)
    with pytest.raises(InputError, match="2-D"):
        pipe.register(np.random.rand(16, 16), m)
    with pytest.raises(InputError, match="different grids"):
        pipe.register(np.random.rand(16, 16, 18), m)
    bad = m.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        pipe.register(bad, m)
    with pytest.raises(InputError, match="constant"):
        pipe.register(np.ones_like(m), m)
    with pytest.raises(InputError, match="no deformable or refine stage"):
        Pipeline(progress=False).register(m, m, init_flow=torch.zeros(1, 3, 16, 16, 16))


def test_presets_build_and_refine_runs_from_a_given_field():
    for name in ("fast", "accurate", "refine"):
        pipe = load_preset(name, affine=None, progress=False, device="cpu")
        assert isinstance(pipe, Pipeline) and pipe.affine is None
    moving, fixed, u_true = known_pair((24, 24, 24), amplitude=1.5)
    pipe = load_preset("refine", progress=False, device="cpu", **{"refine.iterations": 3})
    res = pipe.register(moving, fixed, init_flow=u_true)
    assert res.deformable.stages[0].name == "refine" and res.deformable.stages[0].iterations == 3


def test_loss_curve_png(tmp_path):
    pytest.importorskip("matplotlib")
    moving, fixed, _ = known_pair((16, 16, 16), amplitude=1.0)
    res = quick(iterations=(5, 3))(moving, fixed)
    path = plot_loss_curves(res.stages, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
