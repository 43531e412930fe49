"""Spatial transformer and field operations against hand-computed cases."""
import itertools

import numpy as np
import pytest
import torch

from regkit import compose_flows, integrate_velocity, warp
from regkit.spatial import jacobian_determinant, resize_flow

SHAPES = [(9, 11), (7, 9, 11)]


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_zero_flow_is_identity(shape):
    torch.manual_seed(0)
    img = torch.rand(2, 3, *shape)
    lab = torch.randint(0, 50, (2, 1, *shape))
    flow = torch.zeros(2, len(shape), *shape)
    assert torch.allclose(warp(img, flow), img, atol=1e-6, rtol=0)
    out = warp(lab, flow, mode="nearest")
    assert out.dtype == lab.dtype and torch.equal(out, lab)


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_integer_shift_moves_content(shape, mode):
    torch.manual_seed(1)
    img = torch.rand(1, 1, *shape)
    for axis, shift in itertools.product(range(len(shape)), (-2, 1, 3)):
        flow = torch.zeros(1, len(shape), *shape)
        flow[:, axis] = shift
        out = warp(img, flow, mode=mode)
        n = shape[axis]
        # out[x] = img[x + shift] where x + shift is inside the image, zero elsewhere
        dst = [slice(None)] * len(shape)
        src = [slice(None)] * len(shape)
        dst[axis] = slice(max(0, -shift), min(n, n - shift))
        src[axis] = slice(max(0, shift), min(n, n + shift))
        assert torch.allclose(out[(0, 0, *dst)], img[(0, 0, *src)], atol=1e-5)
        outside = [slice(None)] * len(shape)
        outside[axis] = slice(n - shift, n) if shift > 0 else slice(0, -shift)
        assert torch.all(out[(0, 0, *outside)] == 0)


def _naive_trilinear(img, flow):
    """Independent reference: loop over voxels, zero outside the image."""
    d, h, w = img.shape
    out = np.zeros_like(img)
    for z, y, x in itertools.product(range(d), range(h), range(w)):
        p = np.array([z, y, x], dtype=np.float64) + flow[:, z, y, x]
        base = np.floor(p).astype(int)
        frac = p - base
        val = 0.0
        for corner in itertools.product((0, 1), repeat=3):
            q = base + corner
            if all(0 <= q[k] < s for k, s in enumerate(img.shape)):
                wgt = np.prod([frac[k] if c else 1 - frac[k] for k, c in enumerate(corner)])
                val += wgt * img[tuple(q)]
        out[z, y, x] = val
    return out


def test_warp_matches_naive_trilinear_float64():
    rng = np.random.default_rng(0)
    img = rng.random((5, 6, 7))
    flow = rng.normal(0, 1.5, size=(3, 5, 6, 7))
    got = warp(torch.from_numpy(img)[None, None], torch.from_numpy(flow)[None])[0, 0].numpy()
    np.testing.assert_allclose(got, _naive_trilinear(img, flow), atol=1e-12)


@pytest.mark.parametrize(
    "image,flow,match",
    [
        ((1, 1, 8, 8, 8), (1, 3, 8, 8, 9), "spatial shape"),
        ((1, 1, 8, 8, 8), (1, 2, 8, 8, 8), "channels"),
        ((1, 1, 8, 8), (1, 3, 8, 8, 8), "spatial shape"),
        ((2, 1, 8, 8), (3, 2, 8, 8), "batch sizes"),
    ],
)
def test_warp_rejects_bad_shapes(image, flow, match):
    with pytest.raises(ValueError, match=match):
        warp(torch.zeros(image), torch.zeros(flow))


def test_warp_rejects_unknown_mode():
    with pytest.raises(ValueError, match="Unknown warp mode 'cubic'"):
        warp(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4), mode="cubic")


def test_integrate_constant_velocity_is_translation():
    v = torch.zeros(1, 3, 12, 12, 12, dtype=torch.float64)
    v[:, 0], v[:, 2] = 1.5, -0.75
    assert torch.allclose(integrate_velocity(v, steps=7), v, atol=1e-12)
    assert torch.equal(integrate_velocity(torch.zeros_like(v)), torch.zeros_like(v))


def test_integrate_half_resolution_constant_velocity():
    v = torch.zeros(1, 3, 16, 16, 16, dtype=torch.float64)
    v[:, 1] = 2.0
    assert torch.allclose(integrate_velocity(v, steps=7, downsize=2), v, atol=1e-10)


def test_smooth_velocity_gives_no_folding():
    torch.manual_seed(0)
    coarse = torch.randn(1, 3, 6, 6, 6, dtype=torch.float64)
    v = torch.nn.functional.interpolate(coarse, size=(32, 32, 32), mode="trilinear", align_corners=True)
    v = v / v.abs().max() * 8.0  # large enough that the raw field folds (3.7% of voxels)
    assert (jacobian_determinant(v) <= 0).any()
    assert (jacobian_determinant(integrate_velocity(v, steps=7)) > 0).all()


def test_compose_translations_add():
    a = torch.zeros(1, 2, 10, 10)
    b = torch.zeros(1, 2, 10, 10)
    a[:, 0], b[:, 1] = 2.0, -1.0
    assert torch.allclose(compose_flows(a, b), a + b)


def test_compose_equals_warping_twice():
    torch.manual_seed(2)
    # a linear image: linear interpolation reproduces it exactly, so the only error left is the
    # composition's (to round-off where every sample falls inside the volume)
    g = torch.meshgrid(*[torch.arange(20, dtype=torch.float64)] * 3, indexing="ij")
    img = (0.3 * g[0] + 0.5 * g[1] - 0.2 * g[2])[None, None]
    smooth = lambda: torch.nn.functional.interpolate(torch.randn(1, 3, 3, 3, 3, dtype=torch.float64),
                                                     size=(20, 20, 20), mode="trilinear", align_corners=True)
    f1, f2 = smooth(), smooth()
    twice = warp(warp(img, f1), f2)
    once = warp(img, compose_flows(f1, f2))
    inner = (slice(None), slice(None), slice(5, 15), slice(5, 15), slice(5, 15))
    assert (twice - once)[inner].abs().max() < 1e-10
    wrong = warp(img, f1 + f2)  # adding the flows is not composing them
    assert (twice - wrong)[inner].abs().max() > 0.05


def test_jacobian_of_translation_and_scaling():
    t = torch.zeros(1, 3, 6, 7, 8)
    t[:, 1] = 3.3
    assert torch.allclose(jacobian_determinant(t), torch.ones(1, 6, 7, 8))
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in (6, 7, 8)], indexing="ij"))[None]
    assert torch.allclose(jacobian_determinant(0.1 * grid), torch.full((1, 6, 7, 8), 1.1 ** 3, dtype=torch.float64))


def test_resize_flow_rescales_vectors():
    f = torch.ones(1, 3, 9, 9, 9)
    out = resize_flow(f, (17, 17, 17))
    assert out.shape == (1, 3, 17, 17, 17) and torch.allclose(out, torch.full_like(out, 2.0))
