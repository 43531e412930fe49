"""Loss terms: LNCC implementations against an independent naive computation, gradients,
edge cases, bad input, and every registry name with its default arguments."""
import itertools

import numpy as np
import pytest
import torch

import torch.nn.functional as F

import regkit
from regkit.losses import CompositeLoss
from regkit.losses.lncc import box_filter, window_sums
from regkit.models import RegistrationOutput

LNCC_NAMES = ["lncc", "lncc_group", "lncc_fast"]


def naive_lncc(I, J, window, eps=1e-5):
    """-mean(cc) by explicit window loops (float64); I, J: (B, C, *spatial) numpy arrays."""
    r = window // 2
    spatial = I.shape[2:]
    n = window ** len(spatial)
    total, count = 0.0, 0
    for b, c in itertools.product(range(I.shape[0]), range(I.shape[1])):
        for p in itertools.product(*[range(s) for s in spatial]):
            win = tuple(slice(max(0, q - r), min(s, q + r + 1)) for q, s in zip(p, spatial))
            i, j = I[(b, c) + win], J[(b, c) + win]
            si, sj = i.sum(), j.sum()
            cross = (i * j).sum() - si * sj / n
            vi = (i * i).sum() - si * si / n
            vj = (j * j).sum() - sj * sj / n
            total += cross * cross / (vi * vj + eps)
            count += 1
    return -total / count


CASES = [((2, 2, 7, 8), w) for w in (3, 5, 7, 9)] + [((2, 2, 5, 6, 7), w) for w in (3, 5, 7, 9)]


@pytest.mark.parametrize("name", LNCC_NAMES)
@pytest.mark.parametrize("shape,window", CASES, ids=[f"{len(s) - 2}d-w{w}" for s, w in CASES])
def test_lncc_matches_naive_float64(name, shape, window):
    rng = np.random.default_rng(window)
    I, J = rng.random(shape), rng.random(shape)
    J = 0.6 * I + 0.4 * J  # correlated, so cc is not tiny
    got = regkit.create_loss(name, window=window)(torch.from_numpy(I), torch.from_numpy(J))
    assert got.dtype == torch.float64
    assert abs(got.item() - naive_lncc(I, J, window)) < 1e-12


@pytest.mark.parametrize("ndim", [2, 3])
def test_lncc_implementations_agree_value_and_gradient(ndim):
    torch.manual_seed(0)
    shape = (2, 3) + ((21, 23) if ndim == 2 else (11, 13, 15))
    I0, J0 = torch.rand(shape, dtype=torch.float64), torch.rand(shape, dtype=torch.float64)
    results = {}
    for name in LNCC_NAMES:
        I, J = I0.clone().requires_grad_(), J0.clone().requires_grad_()
        loss = regkit.create_loss(name)(I, J)
        results[name] = (loss.detach(), *torch.autograd.grad(loss, [I, J]))
    ref = results["lncc"]
    for name in ("lncc_group", "lncc_fast"):
        for a, b in zip(results[name], ref):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-15), name


def test_lncc_fast_gradcheck():
    torch.manual_seed(1)
    I = torch.rand(1, 2, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    J = torch.rand(1, 2, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    loss = regkit.create_loss("lncc_fast", window=3)
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b), (I, J))
    # only one input needing a gradient takes the cheaper backward path
    assert torch.autograd.gradcheck(lambda a: loss(a, J.detach()), (I,))
    assert torch.autograd.gradcheck(lambda b: loss(I.detach(), b), (J,))


def test_lncc_fast_float32_tolerance():
    torch.manual_seed(2)
    I, J = torch.rand(1, 1, 40, 48, 56), torch.rand(1, 1, 40, 48, 56)
    J = 0.5 * I + 0.5 * J
    loss = regkit.create_loss("lncc_fast")
    ref = loss(I.double(), J.double()).item()
    assert abs(loss(I, J).item() - ref) < 1e-5 * abs(ref) + 1e-6


def blob_pair(shape=(24, 28, 32), offset=0.0):
    """A zero-background pair, float32 (1, 1, *shape): a textured, noisy ellipsoid and the same
    moved a little. Near-background windows have small variances, where cc is most sensitive."""
    g = torch.Generator().manual_seed(0)
    axes = [torch.linspace(-1, 1, s, dtype=torch.float64) for s in shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")

    def image(shift):
        r2 = (z / 0.7) ** 2 + ((y - shift) / 0.75) ** 2 + (x / 0.8) ** 2
        inside = torch.sigmoid((1 - r2) * 12) * (r2 < 1.3)
        texture = 0.55 + 0.25 * torch.sin(7 * x + 3 * z) * torch.cos(5 * (y - shift))
        noise = 0.02 * torch.randn(shape, generator=g, dtype=torch.float64)
        return (inside * (texture + noise) * (inside > 1e-3)).clamp(0, 1) + offset

    return image(0.0).float()[None, None], image(0.08).float()[None, None]


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_lncc_fast_float32_accuracy_on_zero_background(offset):
    # measured: value 3e-8 / 7e-9, gradient 2e-7 / 9e-7 (lncc in float32: 3e-7 and 1e-6 at
    # offset 0; at offset 100 its value is off by a factor of hundreds)
    I, J = blob_pair(offset=offset)
    I64 = I.double().requires_grad_()
    ref = regkit.create_loss("lncc")(I64, J.double())
    ref.backward()
    I32 = I.clone().requires_grad_()
    got = regkit.create_loss("lncc_fast")(I32, J)
    got.backward()
    assert abs(got.item() - ref.item()) < 1e-6 * abs(ref.item())
    assert (I32.grad.double() - I64.grad).abs().max() < 1e-5 * I64.grad.abs().max()


@pytest.mark.parametrize("window", [1, 3, 5, 9, 13, 17])
@pytest.mark.parametrize("ndim", [2, 3])
def test_box_filter_equals_ones_convolution(window, ndim):
    # 13 and 17 are wider than some axes (the windows reach past both ends)
    torch.manual_seed(window)
    x = torch.randn((2, 3) + ((11, 15) if ndim == 2 else (7, 9, 12)), dtype=torch.float64)
    conv = F.conv2d if ndim == 2 else F.conv3d
    kernel = torch.ones((1, 1) + (window,) * ndim, dtype=torch.float64)
    ref = conv(x.reshape(6, 1, *x.shape[2:]), kernel, padding=window // 2).reshape(x.shape)
    assert torch.allclose(box_filter(x, window), ref, rtol=1e-13, atol=1e-12)


def test_window_sums_any_width():
    x = torch.randn(2, 1, 30, dtype=torch.float64)
    for w in range(1, 31):
        ref = x.unfold(2, w, 1).sum(-1)
        assert torch.allclose(window_sums(x, w, 2), ref, rtol=1e-13, atol=1e-13), w


@pytest.mark.parametrize("name", LNCC_NAMES)
def test_identical_images_give_the_minimum(name):
    torch.manual_seed(3)
    I = torch.rand(1, 1, 16, 16, 16, dtype=torch.float64)
    loss = regkit.create_loss(name)
    best = loss(I, I).item()
    assert best < -0.99
    for scale in (0.1, 0.3):
        assert loss(I, I + scale * torch.rand_like(I)).item() > best


@pytest.mark.parametrize("name", LNCC_NAMES)
def test_constant_images_are_finite(name):
    I = torch.full((1, 1, 12, 12, 12), 0.5, requires_grad=True)
    loss = regkit.create_loss(name)(I, torch.full((1, 1, 12, 12, 12), 0.3))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(I.grad).all()


def test_lncc_fast_never_sees_negative_variance():
    # values with a large offset: float32 cancellation in E[x²] - E[x]² would go negative
    I = (1000 + 1e-3 * torch.rand(1, 1, 16, 16, 16)).requires_grad_()
    loss = regkit.create_loss("lncc_fast")(I, 1000 + 1e-3 * torch.rand(1, 1, 16, 16, 16))
    loss.backward()
    assert torch.isfinite(loss) and -1.0 <= loss.item() <= 0.0 and torch.isfinite(I.grad).all()


@pytest.mark.parametrize("name", LNCC_NAMES)
@pytest.mark.parametrize("window", [0, 4, -3, 2.5, True])
def test_bad_window(name, window):
    with pytest.raises(ValueError, match="window must be an odd positive integer"):
        regkit.create_loss(name, window=window)


@pytest.mark.parametrize("name", LNCC_NAMES)
def test_shape_mismatch(name):
    with pytest.raises(ValueError, match=r"same shape.*\(1, 1, 8, 8, 8\).*\(1, 1, 8, 8, 9\)"):
        regkit.create_loss(name)(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 9))


def test_grad_regulariser_hand_computed():
    # flow_0 = 0.5 * index along axis 0, others zero: only the d/dz of channel 0 is nonzero (0.5)
    idx = torch.arange(6, dtype=torch.float64).view(6, 1, 1).expand(6, 7, 8)
    flow = torch.zeros(1, 3, 6, 7, 8, dtype=torch.float64)
    flow[0, 0] = 0.5 * idx
    # axis-0 differences: channel 0 is 0.5 everywhere, channels 1, 2 zero -> mean of squares 0.25/3
    l2 = regkit.create_loss("grad", penalty="l2")(flow).item()
    l1 = regkit.create_loss("grad", penalty="l1")(flow).item()
    assert abs(l2 - (0.25 / 3) / 3) < 1e-15
    assert abs(l1 - (0.5 / 3) / 3) < 1e-15


def _inputs_for(term, shape=(1, 1, 16, 16, 16)):
    torch.manual_seed(0)
    if term.inputs == "images":
        return torch.rand(shape), torch.rand(shape)
    if term.inputs == "flow":
        return (torch.randn(shape[0], 3, *shape[2:]),)
    if term.inputs == "keypoints":
        fixed = torch.rand(shape[0], 10, 3) * (shape[2] - 1)
        return torch.randn(shape[0], 3, *shape[2:]), fixed, fixed + torch.randn(shape[0], 10, 3)
    k = len(term.labels)
    return torch.rand(shape[0], k, *shape[2:]), (torch.rand(shape[0], k, *shape[2:]) > 0.5).float()


@pytest.mark.parametrize("name", regkit.list_losses())
def test_every_loss_runs_with_defaults(name):
    term = regkit.create_loss(name)
    assert term.inputs in ("images", "flow", "labels", "keypoints")
    value = term(*_inputs_for(term))
    assert value.dim() == 0 and torch.isfinite(value)


def test_composite_reports_named_terms_and_weighted_total():
    loss = CompositeLoss({"lncc_fast": {"weight": 1.0}, "grad": {"weight": 2.5, "penalty": "l1"}})
    torch.manual_seed(0)
    out = RegistrationOutput(warped=torch.rand(1, 1, 16, 16, 16), flow=torch.randn(1, 3, 16, 16, 16))
    res = loss(out, {"fixed": torch.rand(1, 1, 16, 16, 16)})
    assert set(res.terms) == {"lncc_fast", "grad"}
    assert torch.allclose(res.total, res.terms["lncc_fast"] + 2.5 * res.terms["grad"])
    assert loss.terms["grad"].penalty == "l1"


def test_composite_unknown_term_name():
    with pytest.raises(ValueError, match="Unknown loss 'gard'.*Did you mean 'grad'"):
        CompositeLoss({"gard": {"weight": 1.0}})


def test_composite_regularises_velocity_when_present():
    loss = CompositeLoss({"grad": {"weight": 1.0}})
    flow, vel = torch.zeros(1, 3, 8, 8, 8), torch.randn(1, 3, 8, 8, 8)
    res = loss(RegistrationOutput(torch.zeros(1, 1, 8, 8, 8), flow, vel), {})
    assert res.total.item() == pytest.approx(regkit.create_loss("grad")(vel).item())


# ----------------------------------------------------------------------------- global similarity
def test_ncc_hand_computed():
    # I = [1, 2, 3, 4], J = [1, 3, 2, 4]: deviations +-1.5, +-0.5; cov 1.0, var 1.25 -> rho 0.8
    I = torch.tensor([1.0, 2, 3, 4], dtype=torch.float64).view(1, 1, 2, 2)
    J = torch.tensor([1.0, 3, 2, 4], dtype=torch.float64).view(1, 1, 2, 2)
    ncc = regkit.create_loss("ncc")
    assert ncc(I, J).item() == pytest.approx(0.2, abs=1e-15)
    # per batch item and channel, then the mean: rho 0.8 and 1.0 -> loss 0.1
    assert ncc(torch.cat([I, I]), torch.cat([J, I])).item() == pytest.approx(0.1, abs=1e-15)


def test_ncc_identical_affine_and_inverted_images():
    torch.manual_seed(0)
    I = torch.rand(2, 1, 6, 7, 8, dtype=torch.float64)
    ncc = regkit.create_loss("ncc")
    assert abs(ncc(I, I).item()) < 1e-14
    assert abs(ncc(I, 2 * I + 3).item()) < 1e-14
    assert ncc(I, -I).item() == pytest.approx(2.0, abs=1e-14)


def test_ncc_constant_image_is_finite():
    I = torch.full((1, 1, 6, 6, 6), 0.4, dtype=torch.float64, requires_grad=True)
    value = regkit.create_loss("ncc")(I, torch.rand(1, 1, 6, 6, 6, dtype=torch.float64))
    value.backward()
    assert value.item() == pytest.approx(1.0, abs=1e-12) and torch.isfinite(I.grad).all()


def test_mse_hand_computed():
    I = torch.tensor([0.0, 1, 2, 3]).view(1, 1, 2, 2)
    J = torch.ones(1, 1, 2, 2)
    assert regkit.create_loss("mse")(I, J).item() == pytest.approx(1.5)  # (1 + 0 + 1 + 4) / 4


def test_mi_wraps_monai_and_prefers_aligned_images():
    from monai.losses import GlobalMutualInformationLoss

    torch.manual_seed(0)
    I = torch.rand(2, 1, 12, 12, 12)
    mi = regkit.create_loss("mi")
    ref = GlobalMutualInformationLoss(num_bins=23, sigma_ratio=0.5)(I, I.flip(2))
    assert mi(I, I.flip(2)).item() == pytest.approx(ref.item(), rel=1e-6)
    aligned, unrelated = mi(I, I).item(), mi(I, torch.rand_like(I)).item()
    assert -np.log(23) <= aligned < unrelated <= 0


@pytest.mark.parametrize("values", [(-0.5, 1.0), (0.0, 255.0)])
def test_mi_rejects_intensities_outside_unit_range(values):
    I = torch.linspace(*values, 512).view(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=r"warped intensities must lie in \[0, 1\].*normalize"):
        regkit.create_loss("mi")(I, torch.rand_like(I))


@pytest.mark.parametrize("kwargs,match", [({"num_bins": 1}, "num_bins"), ({"num_bins": 8.5}, "num_bins"),
                                          ({"sigma_ratio": 0}, "sigma_ratio")])
def test_mi_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        regkit.create_loss("mi", **kwargs)


@pytest.mark.parametrize("name", ["ncc", "mse", "mi"])
def test_global_similarity_shape_mismatch(name):
    with pytest.raises(ValueError, match=r"same shape.*\(1, 1, 8, 8, 8\).*\(1, 1, 8, 8, 9\)"):
        regkit.create_loss(name)(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 9))


# ----------------------------------------------------------------------------- dice
def test_dice_hand_computed_and_absent_labels_skipped():
    dice = regkit.create_loss("dice", labels=[5, 9])
    p = torch.zeros(1, 2, 2, 2)
    q = torch.zeros(1, 2, 2, 2)
    p[0, 0].view(-1)[:2] = 1  # label 5: two voxels in the warped map, one in the fixed map
    q[0, 0].view(-1)[:1] = 1  # -> Dice 2 * 1 / (2 + 1); label 9 absent from both: skipped
    assert dice(p, q).item() == pytest.approx(1 - 2 / 3)
    assert dice(q, q).item() == pytest.approx(0.0)
    soft = p * 0.5  # soft (linearly warped) maps: 2 * 0.5 / (1 + 1)
    assert dice(soft, q).item() == pytest.approx(0.5)


def test_dice_with_no_label_present_is_zero_and_differentiable():
    p = torch.zeros(1, 2, 3, 3, 3, requires_grad=True)
    value = regkit.create_loss("dice", labels=[1, 2])(p, torch.zeros(1, 2, 3, 3, 3))
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(p.grad).all()


def test_dice_default_labels_are_the_ixi_structures():
    from regkit.metrics import IXI_LABELS

    assert regkit.create_loss("dice").labels == (2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31,
                                                 41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54, 60, 63)
    assert regkit.create_loss("dice", labels="ixi").labels == IXI_LABELS  # by name, defined once (metrics)


@pytest.mark.parametrize("labels,match", [([], "non-empty"), (None, "non-empty"), ([1, 1], "distinct"),
                                          ([1, 2.5], "integer"), ("2,3", r"Dice: Unknown label set '2,3'")])
def test_dice_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        regkit.create_loss("dice", labels=labels)


def test_dice_channel_count_mismatch():
    with pytest.raises(ValueError, match=r"\(B, 2, \*spatial\) for 2 labels, got shape \(1, 3, 4, 4, 4\)"):
        regkit.create_loss("dice", labels=[1, 2])(torch.rand(1, 3, 4, 4, 4), torch.rand(1, 3, 4, 4, 4))


# ----------------------------------------------------------------------------- regularisers
def _coords(shape, dtype=torch.float64):
    return torch.meshgrid(*[torch.arange(s, dtype=dtype) for s in shape], indexing="ij")


def test_bending_energy_of_a_quadratic_field():
    # u_0 = 0.5 x0², u_1 = 0.3 x0 x1, u_2 = 0.2 x2² + 0.1 x1 x2: per voxel
    # (d00 u_0)² = 1; 2 (d01 u_1)² = 0.18; (d22 u_2)² = 0.16; 2 (d12 u_2)² = 0.02 -> 1.36
    x0, x1, x2 = _coords((6, 7, 8))
    flow = torch.stack([0.5 * x0 ** 2, 0.3 * x0 * x1, 0.2 * x2 ** 2 + 0.1 * x1 * x2])[None]
    assert regkit.create_loss("bending")(flow).item() == pytest.approx(1.36, abs=1e-12)
    # 2-D: u_0 = x0 x1, u_1 = 0.5 x1² -> 2 * 1 + 1 = 3; affine fields bend nothing
    y0, y1 = _coords((5, 6))
    assert regkit.create_loss("bending")(torch.stack([y0 * y1, 0.5 * y1 ** 2])[None]).item() == pytest.approx(3.0)
    affine = torch.stack([0.3 * x0 + 2 * x1 - 1, x2 - x0, 0.5 * x1])[None]
    assert abs(regkit.create_loss("bending")(affine).item()) < 1e-20


def test_folding_penalty_zero_without_folds_and_exact_for_a_reflection():
    folding = regkit.create_loss("folding")
    translation = torch.ones(2, 3, 5, 6, 7) * torch.tensor([1.5, -2.0, 0.25]).view(1, 3, 1, 1, 1)
    assert folding(translation).item() == 0.0
    smooth = 0.3 * torch.sin(torch.stack(_coords((8, 8, 8), torch.float32)) / 3)[None]  # |du/dx| <= 0.1
    assert folding(smooth).item() == 0.0
    # x0 + u_0 = -x0 (a reflection along axis 0): det J = -1 everywhere -> penalty 1
    x0, x1, x2 = _coords((5, 6, 7))
    reflection = torch.stack([-2 * x0, torch.zeros_like(x1), torch.zeros_like(x2)])[None].requires_grad_()
    value = folding(reflection)
    value.backward()
    assert value.item() == pytest.approx(1.0, abs=1e-12)
    assert reflection.grad.abs().sum() > 0  # it pushes the fold back
    # with a margin, det 0.5 (compression by half along axis 0) costs margin - 0.5
    half = torch.stack([-0.5 * x0, torch.zeros_like(x1), torch.zeros_like(x2)])[None]
    assert regkit.create_loss("folding", margin=0.6)(half).item() == pytest.approx(0.1, abs=1e-12)
    assert regkit.create_loss("folding")(half).item() == 0.0
    # 2-D reflection
    y0, y1 = _coords((6, 5))
    assert folding(torch.stack([-2 * y0, torch.zeros_like(y1)])[None]).item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["grad", "bending", "folding"])
@pytest.mark.parametrize("shape", [(1, 2, 8, 8, 8), (1, 3, 8, 8), (1, 3), (1, 3, 8, 8, 8, 8)])
def test_regularisers_reject_bad_fields(name, shape):
    with pytest.raises(ValueError, match=r"flow must be \(B, ndim, \*spatial\)"):
        regkit.create_loss(name)(torch.zeros(shape))


def test_bending_needs_three_voxels_per_axis():
    with pytest.raises(ValueError, match=">= 3 voxels"):
        regkit.create_loss("bending")(torch.zeros(1, 3, 8, 2, 8))


def test_folding_bad_margin():
    with pytest.raises(ValueError, match="margin"):
        regkit.create_loss("folding", margin=2.0)


def test_composite_folding_acts_on_the_displacement():
    # diffeomorphic output: smoothness terms see the velocity, the folding term the flow
    x0, x1, x2 = _coords((6, 6, 6), torch.float32)
    fold = torch.stack([-2 * x0, torch.zeros_like(x1), torch.zeros_like(x2)])[None]
    loss = CompositeLoss({"folding": {"weight": 1.0}, "grad": {"weight": 1.0}})
    res = loss(RegistrationOutput(torch.zeros(1, 1, 6, 6, 6), flow=fold, velocity=torch.zeros_like(fold)), {})
    assert res.terms["folding"].item() == pytest.approx(1.0) and res.terms["grad"].item() == 0.0


# ----------------------------------------------------------------------------- configs on a real batch
@pytest.fixture(scope="module")
def real_batch(tmp_path_factory):
    """One training batch of the synthetic NIfTI dataset (images, label maps), as the trainer sees it,
    plus keypoints as a Learn2Reg dataset's batches carry them (padded, with a mask)."""
    from regkit.data.synthetic import SyntheticData

    data = SyntheticData(tmp_path_factory.mktemp("losses"), shape=(24, 24, 24), n_train=2, n_val=0, n_test=0,
                         batch_size=2, normalize="minmax")
    batch = next(iter(data.train_dataloader()))
    fixed = torch.rand(2, 12, 3, generator=torch.Generator().manual_seed(0)) * 23
    batch.update(fixed_keypoints=fixed.double(), moving_keypoints=(fixed + 1.5).double(),
                 keypoints_mask=torch.arange(12).expand(2, 12) < torch.tensor([[12], [9]]))
    return batch


def public_state(term):
    """What defines a built term: its class, repr and public attributes (options as stored)."""
    return type(term), repr(term), {k: v for k, v in vars(term).items() if not k.startswith("_") and k not in ("training", "regkit_spec")}


@pytest.mark.parametrize("name", regkit.list_losses())
def test_config_and_registry_build_the_same_term(name):
    """configs/loss/<name>.yaml lists its term's options as ${regkit.default:}: built from the YAML,
    by name through the registry, or added by name to a recipe, the term is the same, so its
    defaults are written once (the class signature)."""
    from hydra.utils import instantiate

    from tests.conftest import compose

    from_yaml = instantiate(compose([f"loss={name}"]).loss).terms[name]
    assert public_state(from_yaml) == public_state(regkit.create_loss(name))
    recipe = "loss=bending" if name != "bending" else "loss=grad"  # one without the term
    added = instantiate(compose([recipe, f"+loss.terms.{name}.weight=1"]).loss)
    assert public_state(added.terms[name]) == public_state(from_yaml)


def test_docs_loss_table_states_the_code_defaults():
    """docs/losses.md's "options (defaults)" column quotes the class defaults; it must not drift."""
    import ast
    import re

    from tests.conftest import ROOT

    rows = {}
    for line in (ROOT / "docs" / "losses.md").read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 6 and re.fullmatch(r"`\w+`", cells[0]) and cells[0].strip("`") in regkit.list_losses():
            rows[cells[0].strip("`")] = cells[4]
    assert sorted(rows) == regkit.list_losses()
    previous = None
    for name, cell in rows.items():
        quoted = dict(re.findall(r"`(\w+)=([^`]+)`", cell)) if cell != "same" else previous
        options = regkit.losses.LOSSES.options(name)
        assert {k: ast.literal_eval(v) for k, v in quoted.items()} == {k: options[k] for k in quoted}, name
        assert set(quoted) <= set(options) and (quoted or cell == "–" and not options), name
        previous = quoted


def test_term_options_are_overridden_from_the_command_line():
    from hydra.utils import instantiate

    from tests.conftest import compose

    loss = instantiate(compose(["loss=lncc_fast", "loss.terms.lncc_fast.loss.window=7", "loss.terms.grad.weight=5",
                                "loss.terms.grad.loss.penalty=l1"]).loss)
    assert loss.terms["lncc_fast"].window == 7 and loss.terms["grad"].penalty == "l1" and loss.weights["grad"] == 5


def _run_config(cfg, batch):
    from hydra.utils import instantiate

    loss = instantiate(cfg.loss)
    torch.manual_seed(0)
    flow = (0.5 * torch.randn(2, 3, 24, 24, 24)).requires_grad_()
    out = RegistrationOutput(warped=regkit.warp(batch["moving"], flow), flow=flow)
    res = loss(out, batch)
    res.total.backward()
    return loss, res, flow


@pytest.mark.parametrize("name", regkit.list_losses())
def test_every_loss_config_trains_on_a_real_batch(name, real_batch):
    from tests.conftest import compose

    loss, res, flow = _run_config(compose([f"loss={name}"]), real_batch)
    assert set(res.terms) == set(loss.terms) and torch.isfinite(res.total)
    assert torch.isfinite(flow.grad).all() and flow.grad.abs().sum() > 0


def test_terms_added_and_removed_from_the_command_line(real_batch):
    from tests.conftest import compose

    cfg = compose(["loss=lncc_fast", "~loss.terms.grad", "+loss.terms.bending.weight=0.5",
                   "+loss.terms.dice.weight=1", "+loss.terms.dice.labels=[2,3,41,42]",
                   "+loss.terms.folding.weight=10", "+loss.terms.folding.margin=0.1"])
    loss, res, _ = _run_config(cfg, real_batch)
    assert set(res.terms) == {"lncc_fast", "bending", "dice", "folding"}
    assert loss.terms["dice"].labels == (2, 3, 41, 42) and loss.terms["folding"].margin == 0.1
    assert loss.weights == {"lncc_fast": 1.0, "bending": 0.5, "dice": 1.0, "folding": 10.0}
    assert 0 < res.terms["dice"].item() < 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", LNCC_NAMES)
def test_lncc_on_cuda_matches_cpu_reference(name, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # exact fp32/fp64 convolutions
    torch.manual_seed(0)
    I0, J0 = torch.rand(2, 2, 9, 10, 11, dtype=torch.float64), torch.rand(2, 2, 9, 10, 11, dtype=torch.float64)
    I = I0.clone().requires_grad_()
    ref = regkit.create_loss("lncc")(I, J0)
    (g_ref,) = torch.autograd.grad(ref, [I])
    Ic = I0.cuda().requires_grad_()
    got = regkit.create_loss(name).cuda()(Ic, J0.cuda())
    (g,) = torch.autograd.grad(got, [Ic])
    assert abs(got.item() - ref.item()) < 1e-12
    assert torch.allclose(g.cpu(), g_ref, rtol=1e-10, atol=1e-15)
