"""Every registered model, as a table: counts, shapes at odd sizes, identity at init, learning."""
import json

import pytest
import torch

import regkit
from regkit.models import MODELS, RegistrationOutput

# Small builds for the per-model tests (a model that needs options to stay fast on CPU lists them).
# TransMorph: the reference's TransMorph-Tiny (embed 6), whose count is checked below.
SMALL_KWARGS = {"transmorph": {"embed_dim": 6, "num_heads": (2, 2, 4, 4)}}
TWO_D = {"vxm1", "vxm2", "lkunet", "lkunet16", "lkunet4", "lkunet_diff", "student"}
NAMES = regkit.list_models()


def build(name, **kw):
    torch.manual_seed(0)
    return regkit.create_model(name, **{**SMALL_KWARGS.get(name, {}), **kw})


def check_against_metadata(name):
    """The built model (3-D, one channel, the registered defaults) has the count its registration
    states, and a reference count that differs is explained (LKU-Net's is checked exactly below)."""
    info = MODELS.info(name)
    assert regkit.create_model(name).num_parameters() == info.params
    if info.reference_params != info.params:
        assert info.reference_note


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_is_the_registered_one(name):
    check_against_metadata(name)


@pytest.mark.parametrize("name", NAMES)
def test_every_default_can_be_overridden_by_keyword(name):
    """One rule for every model: each of the registration's defining numbers is a default that a
    keyword overrides (vxm1(enc_channels=...) as lkunet(start_channels=...)), and the override
    is what gets built: building with another variant's values gives that variant's count."""
    defaults = MODELS.defaults(name)
    assert defaults, f"{name} registers no defining numbers"
    assert regkit.create_model(name, **defaults).num_parameters() == MODELS.info(name).params
    for other in NAMES:
        theirs = MODELS.defaults(other)
        if other != name and set(theirs) == set(defaults) and MODELS.info(other).params != MODELS.info(name).params:
            assert regkit.create_model(name, **theirs).num_parameters() == MODELS.info(other).params


@pytest.mark.parametrize("name", NAMES)
def test_odd_size_output_is_identity_at_init(name):
    model = build(name)
    moving, fixed = torch.rand(1, 1, 37, 45, 51), torch.rand(1, 1, 37, 45, 51)
    with torch.no_grad():
        out = model(moving, fixed)
    assert isinstance(out, RegistrationOutput)
    assert out.warped.shape == moving.shape and out.flow.shape == (1, 3, 37, 45, 51)
    assert torch.isfinite(out.flow).all() and torch.isfinite(out.warped).all()
    assert out.flow.abs().max() < 1e-2
    assert torch.allclose(out.warped, moving, atol=1e-2)


@pytest.mark.parametrize("name", sorted(TWO_D & set(NAMES)))
def test_2d(name):
    model = build(name, ndim=2)
    out = model(torch.rand(2, 1, 33, 47), torch.rand(2, 1, 33, 47))
    assert out.flow.shape == (2, 2, 33, 47)


@pytest.mark.parametrize("name", NAMES)
def test_training_step_reduces_loss(name):
    torch.manual_seed(0)
    model = build(name)
    x = torch.linspace(-1, 1, 16)  # the smallest size every model takes, to keep this fast
    zz, yy, xx = torch.meshgrid(x, x, x, indexing="ij")
    blob = lambda c: torch.exp(-((zz - c) ** 2 + yy ** 2 + xx ** 2) / 0.1)[None, None]
    moving, fixed = blob(0.0), blob(0.15)
    loss_fn = regkit.create_loss("mse") if "mse" in regkit.list_losses() else torch.nn.functional.mse_loss
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        out = model(moving, fixed)
        loss = loss_fn(out.warped, fixed)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", NAMES)
def test_diffeomorphic_switch_returns_velocity(name):
    model = build(name, diffeomorphic=True, int_steps=7)
    with torch.no_grad():
        out = model(torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32))
    assert out.velocity is not None and out.velocity.shape == out.flow.shape
    assert out.field is out.velocity


@pytest.mark.parametrize("name", NAMES)
def test_rejects_mismatched_pair(name):
    model = build(name)
    with pytest.raises(ValueError, match=r"same shape.*\(1, 1, 32, 32, 32\).*\(1, 1, 32, 32, 33\)"):
        model(torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 33))


@pytest.mark.parametrize("name", NAMES)
def test_rejects_too_small_input(name):
    model = build(name)
    with pytest.raises(ValueError, match=">= 16"):
        model(torch.rand(1, 1, 8, 32, 32), torch.rand(1, 1, 8, 32, 32))


def assert_same_model(a, b):
    """Same architecture (every layer's repr, parameter names and shapes) and options."""
    assert repr(a) == repr(b)
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]
    for option in ("ndim", "in_channels", "diffeomorphic", "int_steps", "int_downsize", "size_multiple"):
        assert getattr(a, option) == getattr(b, option), option


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_the_registered_model(name):
    """configs/model/<name>.yaml (whose options are ${regkit.default:}) builds exactly what
    create_model(name) builds: the defaults live in the code only."""
    from hydra.utils import instantiate

    from tests.conftest import compose

    cfg = compose([f"model={name}"], output_dir="/tmp/unused")
    model = instantiate(cfg.model)
    assert model.regkit_spec["name"] == name
    assert_same_model(model, regkit.create_model(name))


@pytest.mark.parametrize("name", sorted(set(NAMES) - TWO_D))
def test_3d_only_models_say_so(name):
    with pytest.raises(ValueError, match=r"3-D only.*ndim=2"):
        regkit.create_model(name, ndim=2)


def smooth_random_field(shape, amplitude, seed=0, spacing=8):
    """A smooth random displacement (1, ndim, *shape) in voxels: Gaussian noise (std
    ``amplitude``) on a coarse grid of about ``spacing`` voxels, upsampled (multi)linearly."""
    g = torch.Generator().manual_seed(seed)
    ndim = len(shape)
    noise = torch.randn(1, ndim, *[s // spacing + 2 for s in shape], generator=g, dtype=torch.float64)
    mode = "trilinear" if ndim == 3 else "bilinear"
    return amplitude * torch.nn.functional.interpolate(noise, size=tuple(shape), mode=mode, align_corners=True)


@pytest.mark.parametrize("int_downsize", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_diffeomorphic_integration_removes_folding(name, int_downsize, monkeypatch):
    """The network's field is replaced by a smooth random one that folds as a displacement; the
    same field integrated as a velocity (7 scaling-and-squaring steps) must not fold."""
    model = build(name, diffeomorphic=True, int_steps=7, int_downsize=int_downsize).double()
    # Amplitude 2.5 voxels per 8: about 2% of voxels fold raw, while 7 steps keep det >= ~0.1.
    monkeypatch.setattr(model, "predict_field", lambda x: smooth_random_field(x.shape[2:], amplitude=2.5))
    moving = torch.rand(1, 1, 37, 45, 51, dtype=torch.float64)
    with torch.no_grad():
        out = model(moving, moving)
    raw = out.velocity
    assert raw.shape == out.flow.shape == (1, 3, 37, 45, 51)
    # Precondition: used directly as a displacement, the field folds (else the test is vacuous).
    raw_det = regkit.spatial.jacobian_determinant(raw)
    assert (raw_det <= 0).float().mean() > 0.005, "test field does not fold; make it larger"
    det = regkit.spatial.jacobian_determinant(out.flow)
    assert torch.isfinite(det).all()
    assert det.min() > 0, f"{int((det <= 0).sum())} voxels fold after integration (min det {det.min():.3g})"


# --- LKU-Net ---------------------------------------------------------------------------------
DIFFERENT_FROM_REFERENCE = [n for n in NAMES if MODELS.info(n).reference_params not in (None, MODELS.info(n).params)]


def test_the_lkunets_are_the_models_that_differ_from_their_reference_code():
    assert DIFFERENT_FROM_REFERENCE == ["lkunet", "lkunet16", "lkunet4", "lkunet_diff"]


@pytest.mark.parametrize("name", DIFFERENT_FROM_REFERENCE)
def test_lkunet_count_plus_unused_conv_is_reference_code_count(name):
    """A registered reference count that differs from regkit's build is explained exactly: here,
    by the reference's unused output conv."""
    from regkit.models.lkunet import LKUNet

    model = regkit.create_model(name)
    assert isinstance(model, LKUNet)
    assert model.num_parameters() + model.unused_reference_parameters() == MODELS.info(name).reference_params


class ConstantHead(torch.nn.Module):
    """Stands in for LKU-Net's head conv: a fixed pre-Softsign output per channel."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values)

    def forward(self, y):
        return self.values.view(1, -1, *([1] * (y.dim() - 2))).expand(y.shape[0], -1, *y.shape[2:]).to(y)


@pytest.mark.parametrize("shape", [(32, 48, 64), (48, 32)])
def test_lkunet_head_is_reference_normalised_units_in_voxels(shape):
    """A hand-set head output h gives Softsign(h) in grid_sample's normalised units, channel k along
    axis k (the reference's convention), i.e. Softsign(h_k) * (n_k - 1) / 2 voxels; and warping by
    regkit's flow equals the reference's grid_sample with identity + Softsign(h)."""
    ndim = len(shape)
    pre = [0.5, -2.0, 1.0][:ndim]
    model = regkit.create_model("lkunet", ndim=ndim).double()
    model.flow_head = ConstantHead(pre)
    moving = torch.rand(1, 1, *shape, dtype=torch.float64)
    with torch.no_grad():
        out = model(moving, torch.rand_like(moving))
    for k, (h, n) in enumerate(zip(pre, shape)):
        expected = h / (1 + abs(h)) * (n - 1) / 2
        torch.testing.assert_close(out.flow[:, k], torch.full_like(out.flow[:, k], expected))
    # The reference warps with grid = linspace(-1, 1) per axis + Softsign output, reversed for grid_sample.
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n, dtype=torch.float64) for n in shape], indexing="ij")
    grid = torch.stack([a + h / (1 + abs(h)) for a, h in zip(axes, pre)], dim=-1).flip(-1)[None]
    reference = torch.nn.functional.grid_sample(moving, grid, mode="bilinear", align_corners=True)
    torch.testing.assert_close(out.warped, reference)


def test_lkunet_scaling_commutes_with_integration():
    """LKU-Net-diff integrates in normalised units; regkit integrates in voxels after scaling. The
    two agree (reference-style integration written out here with grid_sample)."""
    torch.manual_seed(0)
    shape = (24, 20, 28)
    v_norm = 0.05 * smooth_random_field(shape, amplitude=1.0, seed=3)
    scale = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64).view(1, 3, 1, 1, 1)
    axes = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n, dtype=torch.float64) for n in shape],
                                      indexing="ij"))[None]
    flow = v_norm / 2 ** 7
    for _ in range(7):
        grid = (axes + flow).permute(0, 2, 3, 4, 1).flip(-1)
        flow = flow + torch.nn.functional.grid_sample(flow, grid, mode="bilinear", padding_mode="border",
                                                      align_corners=True)
    ours = regkit.spatial.integrate_velocity(v_norm * scale, steps=7)
    torch.testing.assert_close(ours, flow * scale)


# --- TransMorph ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,count", [
    ({"embed_dim": 48, "num_heads": (4, 4, 4, 4)}, 11_757_195),                              # -Small
    ({"embed_dim": 128, "depths": (2, 2, 12, 2), "num_heads": (4, 4, 8, 16)}, 108_343_907),  # -Large
    ({"embed_dim": 6, "num_heads": (2, 2, 4, 4)}, 244_527),                                  # -Tiny
])
def test_transmorph_family_counts(kwargs, count):
    assert regkit.create_model("transmorph", **kwargs).num_parameters() == count


def test_transmorph_window_mask_separates_rolled_regions():
    from regkit.models.transmorph import shifted_window_mask, window_partition

    size, window, shift = (10, 12, 14), (5, 6, 7), (2, 3, 3)
    mask = shifted_window_mask(size, window, shift, "cpu")
    assert mask.shape == (8, 210, 210)
    # Tokens of one window may attend iff they were neighbours before the cyclic roll, i.e. their
    # original coordinates differ by less than a window along every axis (exact here: size = 2 windows).
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in size], indexing="ij"), -1)
    rolled = torch.roll(coords, shifts=tuple(-s for s in shift), dims=(0, 1, 2))
    pos = window_partition(rolled[None].float(), window)  # (nW, N, 3) original coordinates
    gap = (pos[:, :, None, :] - pos[:, None, :, :]).abs()
    neighbours = (gap < torch.tensor(window)).all(-1)
    assert torch.equal(mask == 0, neighbours)
    assert 0 < neighbours.float().mean() < 1
    assert set(mask.unique().tolist()) == {0.0, -100.0}


# --- student ---------------------------------------------------------------------------------
@pytest.mark.parametrize("teacher", ["lkunet", "lkunet16", "transmorph"])
def test_student_is_smaller_than_its_teachers(teacher):
    assert regkit.create_model("student").num_parameters() < regkit.create_model(teacher).num_parameters()


# --- checkpoints and docs --------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_rebuilds_the_same_model(name, tmp_path):
    from regkit.checkpoint import load_model, model_spec, save_checkpoint

    model = build(name)
    path = save_checkpoint(tmp_path / "m.ckpt", {"model": model_spec(model), "state_dict": model.state_dict()})
    loaded = load_model(path)  # strict load: every saved tensor must have a home, and vice versa
    assert type(loaded) is type(model) and loaded.regkit_spec["name"] == name
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def load_script(name):
    """scripts/<name>.py as a module (its sibling imports, e.g. doc_sections, resolved)."""
    import importlib.util
    import sys

    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return module


def test_docs_model_table_is_current():
    from tests.conftest import ROOT

    module = load_script("model_table")
    assert module.read_section(ROOT / "docs" / "models.md", module.SECTION) == module.table(), (
        "docs/models.md is stale: run .venv/bin/python scripts/model_table.py --out docs/models.md"
    )


@pytest.mark.parametrize("name", NAMES)
def test_multiply_adds_on_meta_equal_the_full_forward_on_cpu(name):
    """The table counts predict_field on the meta device; the full forward (padding, network, warp,
    integration) on real CPU tensors counts the same per op: the warp and the integration add
    nothing FlopCounterMode counts. Attention takes PyTorch's math path here, as on meta (the
    counter has no formula for the fused CPU kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    size = (17, 20, 23)  # padded to each model's multiple
    model = build(name).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(torch.rand(1, 1, *size), torch.rand(1, 1, *size))
    full = {str(op): n // 2 for op, n in counter.get_flop_counts()["Global"].items()}
    assert full and load_script("model_table").multiply_adds(model, size) == full


def test_vxm2_multiply_adds_are_the_published_figure():
    """The Baskerville case study's VoxelMorph (VxmDense_2) figure, 398.81 G multiply-adds, is
    regkit's count at 160x192x224 to all five digits (docs/models.md compares both models)."""
    macs = sum(load_script("model_table").multiply_adds(regkit.create_model("vxm2"), (160, 192, 224)).values())
    assert round(macs / 1e9, 2) == 398.81


def test_model_table_takes_cpu_time_from_the_benchmark_json(tmp_path):
    module = load_script("model_table")
    path = tmp_path / "bench_models.json"
    record = {"device": "cpu", "size": [160, 192, 224], "conditions": "Device: test.",
              "results": {"vxm1": {"forward": {"median_s": 6.004}, "train": {"median_s": 18.4}},
                          "vxm2": {"forward": {"error": "out of memory"}}}}
    path.write_text(json.dumps(record))
    bench = module.bench_results(path)
    assert [module.cpu_forward(bench, n) for n in ("vxm1", "vxm2", "student")] == ["6.00", "not measured",
                                                                                   "not measured"]
    assert "Device: test." in module.table(["vxm1"], bench_path=path)
    path.write_text(json.dumps({**record, "size": [16, 16, 16]}))  # another size: not this table's figure
    assert module.bench_results(path) is None and module.bench_results(tmp_path / "absent.json") is None


@pytest.mark.parametrize("shifted", [False, True])
def test_transmorph_window_attention_is_the_explicit_formula(shifted):
    """The fused attention equals softmax(q k^T / sqrt(d) + relative bias [+ shift mask]) v,
    written out as the reference does, to float64 round-off (forward and gradients)."""
    from regkit.models.transmorph import WindowAttention, shifted_window_mask

    torch.manual_seed(0)
    window, heads, dim, batch = (5, 6, 7), 2, 12, 2
    attn = WindowAttention(dim, window, heads).double()
    mask = shifted_window_mask((10, 12, 7), window, (2, 3, 3), "cpu").double() if shifted else None
    n_windows = 4 if shifted else 3
    x = torch.randn(batch * n_windows, 210, dim, dtype=torch.float64, requires_grad=True)

    def explicit(x):
        Bn, N, C = x.shape
        q, k, v = attn.qkv(x).view(Bn, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        bias = attn.relative_bias[attn.relative_index.view(-1)].view(N, N, heads).permute(2, 0, 1)
        logits = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1) + bias
        if mask is not None:
            logits = (logits.view(batch, n_windows, heads, N, N) + mask[None, :, None]).view(Bn, heads, N, N)
        return attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(Bn, N, C))

    ours, ref = attn(x, mask), explicit(x)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    params = [x, attn.relative_bias, attn.qkv.weight]
    for a, b in zip(torch.autograd.grad(ours, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.slow  # four processes that import torch: about 10 s of CPU
def test_bench_script_reports_times_and_out_of_memory(tmp_path):
    """scripts/bench_models.py end to end on a tiny input, and its out-of-memory report: a memory
    cap below what the student needs at IXI size must give 'out of memory', not a crash."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "bench.md"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_models.py"), "--models", "student",
                          "--size", "16", "16", "16", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    row = next(line for line in out.read_text().splitlines() if line.startswith("| `student`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "1,548,528" and float(cells[2]) > 0 and float(cells[4]) > 0 and cells[3] == "1.0"
    assert "<!-- bench_models:start -->" in out.read_text()
    # the machine-readable results next to the markdown, which model_table.py reads
    record = json.loads((tmp_path / "data" / "bench_models.json").read_text())
    assert record["size"] == [16, 16, 16] and record["device"] == "cpu" and record["conditions"].startswith("Device:")
    assert record["results"]["student"]["forward"]["params"] == MODELS.info("student").params
    capped = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_models.py"), "--models", "student",
                             "--mem-limit-gb", "0.3"], capture_output=True, text=True)
    assert capped.returncode == 0, capped.stderr
    assert "| `student` | - | out of memory" in capped.stdout and "skipped (forward failed)" in capped.stdout


@pytest.mark.slow  # the full IXI-size TransMorph: about 6 GiB and a minute of CPU
def test_transmorph_full_build_at_ixi_size():
    """The real configuration at the size its windows were chosen for (the last stage is exactly
    one 5x6x7 window), which the fast tests' small build does not exercise."""
    torch.manual_seed(0)
    model = regkit.create_model("transmorph").eval()
    moving = torch.rand(1, 1, 160, 192, 224)
    with torch.no_grad():
        out = model(moving, torch.rand_like(moving))
    assert out.flow.shape == (1, 3, 160, 192, 224) and torch.isfinite(out.flow).all()
    assert out.flow.abs().max() < 0.05 and torch.allclose(out.warped, moving, atol=0.05)
