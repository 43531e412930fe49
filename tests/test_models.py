"""Every registered model, as a table: counts, shapes at odd sizes, identity at init, learning."""
import pytest
import torch

import regkit
from regkit.models import RegistrationOutput

# Reference parameter counts (../shared/REFERENCE.md), 3-D, one input channel.
PARAM_COUNTS = {
    "vxm1": 274_387,
    "vxm2": 301_411,
}
# Small builds for the per-model tests (a model that needs options to stay fast on CPU lists them).
SMALL_KWARGS = {}
TWO_D = {"vxm1", "vxm2"}
MODELS = regkit.list_models()


def build(name, **kw):
    torch.manual_seed(0)
    return regkit.create_model(name, **{**SMALL_KWARGS.get(name, {}), **kw})


def test_every_model_has_a_reference_count():
    assert sorted(PARAM_COUNTS) == MODELS


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count(name):
    assert regkit.create_model(name).num_parameters() == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", MODELS)
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


@pytest.mark.parametrize("name", sorted(TWO_D & set(MODELS)))
def test_2d(name):
    model = build(name, ndim=2)
    out = model(torch.rand(2, 1, 33, 47), torch.rand(2, 1, 33, 47))
    assert out.flow.shape == (2, 2, 33, 47)


@pytest.mark.parametrize("name", MODELS)
def test_training_step_reduces_loss(name):
    torch.manual_seed(0)
    model = build(name)
    x = torch.linspace(-1, 1, 32)
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


@pytest.mark.parametrize("name", MODELS)
def test_diffeomorphic_switch_returns_velocity(name):
    model = build(name, diffeomorphic=True, int_steps=7)
    with torch.no_grad():
        out = model(torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32))
    assert out.velocity is not None and out.velocity.shape == out.flow.shape
    assert out.field is out.velocity


@pytest.mark.parametrize("name", MODELS)
def test_rejects_mismatched_pair(name):
    model = build(name)
    with pytest.raises(ValueError, match=r"same shape.*\(1, 1, 32, 32, 32\).*\(1, 1, 32, 32, 33\)"):
        model(torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 33))


@pytest.mark.parametrize("name", MODELS)
def test_rejects_too_small_input(name):
    model = build(name)
    with pytest.raises(ValueError, match=">= 16"):
        model(torch.rand(1, 1, 8, 32, 32), torch.rand(1, 1, 8, 32, 32))


def test_config_builds_the_registered_model():
    from hydra.utils import instantiate

    from tests.conftest import compose

    for name in MODELS:
        cfg = compose([f"model={name}"], output_dir="/tmp/unused")
        model = instantiate(cfg.model)
        assert model.regkit_spec["name"] == name
        assert model.num_parameters() == regkit.create_model(name).num_parameters()
