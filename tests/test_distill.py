"""Adversarial distillation (ALDK) and recursive cascades: gradients reach both players, the
gradient penalty is twice differentiable, cascades compose their flows, and a short distillation
run through the CLI config writes its logs and checkpoint."""
import pytest
import torch

import regkit
from regkit.distill import DistillationTrainer, FlowDiscriminator, discrimination_terms, gradient_penalty
from regkit.errors import InputError
from regkit.experiment import build, train
from regkit.models import RegistrationOutput
from regkit.models.cascade import Cascade
from regkit.spatial import compose_flows, warp
from regkit.training import PhaseTimer, load_checkpoint, load_model, save_checkpoint
from regkit.checkpoint import model_spec
from tests.conftest import TINY_DATA, compose
from tests.test_models import SMALL_KWARGS
from tests.test_training import scalars


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A vxm1 checkpoint whose flows are clearly non-zero (flow-head bias set), as a teacher."""
    torch.manual_seed(1)
    teacher = regkit.create_model("vxm1")
    with torch.no_grad():
        teacher.flow_head.bias.copy_(torch.tensor([0.7, -0.4, 0.3]))
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    save_checkpoint(path, {"model": model_spec(teacher), "state_dict": teacher.state_dict()})
    return path


# -- the discriminator and the distillation terms -------------------------------------------------
@pytest.mark.parametrize("ndim, size", [(3, 32), (3, 45), (2, 40)])
def test_discriminator_scores_any_training_size(ndim, size):
    disc = FlowDiscriminator(ndim=ndim)
    out = disc(torch.randn(2, ndim, *[size] * ndim))
    assert out.shape == (2, 1) and ((out > 0) & (out < 1)).all()
    convs = [m for m in disc.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128, 256]
    assert all(c.kernel_size == (4,) * ndim and c.stride == (2,) * ndim for c in convs)


@pytest.mark.parametrize("shape, match", [((1, 2, 32, 32, 32), r"\(B, 3, \*spatial\)"),
                                          ((1, 3, 32, 16, 32), ">= 32")])
def test_discriminator_rejects_bad_fields(shape, match):
    with pytest.raises(InputError, match=match):
        FlowDiscriminator(ndim=3)(torch.zeros(shape))


def test_gradient_penalty_is_twice_differentiable():
    """gradcheck of the penalty w.r.t. the field it is evaluated at: its gradient needs the second
    derivative of D (double backward), compared with finite differences in float64."""
    torch.manual_seed(0)
    disc = FlowDiscriminator(ndim=2, channels=(4, 8), negative_slope=0.2).double()
    phi = torch.randn(2, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: gradient_penalty(disc, p), (phi,))
    # and w.r.t. the discriminator's own weights, which its optimizer needs
    penalty = gradient_penalty(disc, phi)
    grads = torch.autograd.grad(penalty, list(disc.parameters()))
    assert all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_gradient_penalty_matches_its_definition():
    """For D linear before the sigmoid, dD/dphi = s(1-s) w / N per voxel: the penalty by hand."""
    disc = FlowDiscriminator(ndim=2, channels=(4,)).double()
    phi = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    got = gradient_penalty(disc, phi)
    x = phi.clone().requires_grad_(True)
    norms = []
    for b in range(3):
        (g,) = torch.autograd.grad(disc(x[b:b + 1]).sum(), x, retain_graph=True)
        norms.append(g[b].norm())
    want = torch.stack([(n - 1) ** 2 for n in norms]).mean()
    assert torch.allclose(got, want, rtol=1e-12, atol=0)


def test_discrimination_terms_follow_the_paper():
    torch.manual_seed(0)
    disc = FlowDiscriminator(ndim=3)
    phi_s, phi_t = torch.randn(2, 3, 32, 32, 32), torch.randn(2, 3, 32, 32, 32) * 2
    t = discrimination_terms(disc, phi_s, phi_t, beta=0.1)
    d_s, d_t = disc(phi_s), disc(phi_t)
    assert torch.allclose(t.gap, ((d_s - d_t) ** 2).mean())
    assert torch.allclose(t.penalty, gradient_penalty(disc, 0.1 * phi_t + 0.9 * phi_s))
    assert torch.allclose(t.l_dis(0.1), t.gap + 0.1 * t.penalty)


# -- one distillation step -----------------------------------------------------------------------
def distill_parts(tmp_path, data_dir, teacher_ckpt, *extra):
    cfg = compose(TINY_DATA + ["experiment=distill", f"teacher.ckpt={teacher_ckpt}", "~logger",
                               "callbacks.checkpoint=null", "callbacks.validation=null", *extra],
                  output_dir=tmp_path, data_dir=data_dir)
    return build(cfg)


def ready_step(tmp_path, data_dir, teacher_ckpt, *extra):
    """A DistillationTrainer set up as ``fit`` would leave it before its loop, and one batch."""
    parts = distill_parts(tmp_path, data_dir, teacher_ckpt, *extra)
    trainer, model = parts["trainer"], parts["model"]
    parts["data"].setup()
    model.to(trainer.device)
    trainer.teacher.to(trainer.device)
    trainer.model, trainer.loss_fn, trainer.optimizer = model, parts["loss"], parts["optimizer"]
    trainer.train_module, trainer.timer = model, PhaseTimer(trainer.device, False, 0)
    torch.manual_seed(1)
    batch = trainer.to_device(next(iter(parts["data"].train_dataloader())))
    return trainer, model, batch


def _one_step(tmp_path, data_dir, teacher_ckpt, *extra):
    trainer, model, batch = ready_step(tmp_path, data_dir, teacher_ckpt, *extra)
    return trainer.training_step(batch), model


def test_one_step_moves_the_student_and_the_discriminator(tmp_path, data_dir, teacher_ckpt):
    trainer, model, batch = ready_step(tmp_path, data_dir, teacher_ckpt)
    assert isinstance(trainer, DistillationTrainer) and type(model).__name__ == "Student"
    student_before = [p.detach().clone() for p in model.parameters()]
    teacher_before = [p.detach().clone() for p in trainer.teacher.parameters()]
    disc_before = [p.detach().clone() for p in trainer.discriminator.parameters()]

    losses = trainer.training_step(batch)

    for name, params, before in (("student", list(model.parameters()), student_before),
                                 ("discriminator", list(trainer.discriminator.parameters()), disc_before)):
        for p, b in zip(params, before):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: a parameter got no gradient"
        assert all(not torch.equal(p, b) for p, b in zip(params, before)), f"{name}: a parameter did not change"
    assert all(torch.equal(p, b) for p, b in zip(trainer.teacher.parameters(), teacher_before))
    assert all(p.grad is None for p in trainer.teacher.parameters())
    terms = losses.terms
    assert {"ncc", "grad", "rec", "l_dis", "dis_gap", "dis_penalty", "D_student", "D_teacher"} <= set(terms)
    expected = 0.3 * terms["rec"] + 0.7 * (terms["dis_gap"] + 0.1 * terms["dis_penalty"])
    assert torch.allclose(losses.total, expected)


def test_the_student_gradient_includes_the_adversarial_term(tmp_path, data_dir, teacher_ckpt):
    """With gamma = 1 (reconstruction only) the student's gradient differs from gamma = 0.3."""
    grads = {}
    for gamma in (1.0, 0.3):
        losses, model = _one_step(tmp_path / str(gamma), data_dir, teacher_ckpt, f"trainer.gamma={gamma}",
                                  "trainer.d_steps=0")
        grads[gamma] = (model.flow_head.weight.grad.clone(), losses)
    g1, l1 = grads[1.0]
    g3, l3 = grads[0.3]
    # same weights and batch: the reconstruction gradient scales by gamma, the rest is l_dis's
    assert torch.allclose(l1.terms["rec"], l3.terms["rec"])
    assert not torch.allclose(0.3 * g1, g3, rtol=1e-3, atol=0)


def test_flow_matching_term_and_penalty_switch(tmp_path, data_dir, teacher_ckpt):
    base, _ = _one_step(tmp_path / "a", data_dir, teacher_ckpt, "trainer.d_steps=0")
    fm, _ = _one_step(tmp_path / "b", data_dir, teacher_ckpt, "trainer.d_steps=0", "trainer.flow_weight=2")
    assert torch.allclose(fm.terms["flow_match"], base.terms["flow_match"]) and base.terms["flow_match"] > 0
    assert torch.allclose(fm.total, base.total + 2 * base.terms["flow_match"])
    # the penalty's value is the same either way; only with penalty_to_student does it train the student
    _, m_off = _one_step(tmp_path / "c", data_dir, teacher_ckpt, "trainer.d_steps=0", "trainer.gamma=0")
    on, m_on = _one_step(tmp_path / "d", data_dir, teacher_ckpt, "trainer.d_steps=0", "trainer.gamma=0",
                         "trainer.penalty_to_student=true")
    assert on.terms["dis_penalty"] > 0
    g_on, g_off = m_on.flow_head.weight.grad, m_off.flow_head.weight.grad
    assert (g_on - g_off).norm() > 1e-2 * g_off.norm()  # the gradients are ~1e-10 at initialisation


@pytest.mark.parametrize("override, match", [("trainer.beta=1.5", "beta"), ("trainer.flow_weight=-1", "flow_weight"), ("trainer.gamma=-0.1", "gamma"),
                                             ("trainer.lam=-1", "lam"), ("trainer.d_steps=-1", "d_steps")])
def test_bad_distillation_options(tmp_path, data_dir, teacher_ckpt, override, match):
    from hydra.errors import InstantiationException

    with pytest.raises((InputError, InstantiationException), match=match):
        distill_parts(tmp_path, data_dir, teacher_ckpt, override)


def test_teacher_checkpoint_is_required(tmp_path, data_dir):
    cfg = compose(TINY_DATA + ["experiment=distill"], output_dir=tmp_path, data_dir=data_dir)
    with pytest.raises(InputError, match=r"missing required value: teacher.ckpt; set it on the command line"):
        build(cfg)


def test_missing_teacher_checkpoint_names_the_file(tmp_path, data_dir):
    from hydra.errors import InstantiationException

    with pytest.raises((InputError, InstantiationException), match="nowhere.ckpt: checkpoint not found"):
        distill_parts(tmp_path, data_dir, tmp_path / "nowhere.ckpt")


def test_short_distillation_run_writes_logs_and_checkpoint(tmp_path, data_dir, teacher_ckpt):
    out = tmp_path / "run"
    cfg = compose(TINY_DATA + ["experiment=distill", f"teacher.ckpt={teacher_ckpt}", "trainer.max_epochs=2",
                               "trainer.warmup_steps=0"], output_dir=out, data_dir=data_dir)
    metrics = train(cfg)
    assert "val/dice" in metrics
    ckpt = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert ckpt["epoch"] == 2 and ckpt["model"]["name"] == "student"
    assert set(ckpt["distill"]) == {"discriminator", "d_optimizer", "teacher_ckpt"}
    student = load_model(out / "checkpoints" / "last.ckpt")  # a plain student, usable on its own
    assert type(student).__name__ == "Student"
    event_dir = next((out / "tensorboard").rglob("events.out.tfevents.*")).parent
    tags = scalars(event_dir)
    for tag in ("train/loss/l_dis", "train/loss/dis_penalty", "train/loss/D_student", "train/loss/D_teacher",
                "train/loss/rec", "train/loss/ncc", "time/discriminator", "time/epoch", "val/dice"):
        assert tag in tags, tag
    # resume restores the discriminator and its optimizer
    cfg = compose(TINY_DATA + ["experiment=distill", f"teacher.ckpt={teacher_ckpt}", "trainer.max_epochs=3",
                               f"ckpt_path={out}/checkpoints/last.ckpt", "~logger"],
                  output_dir=tmp_path / "resumed", data_dir=data_dir)
    parts = build(cfg)
    trainer = parts["trainer"]
    trainer.fit(parts["model"], parts["loss"], parts["optimizer"], parts["data"], ckpt_path=cfg.ckpt_path)
    assert trainer.epoch == 3
    # the resumed discriminator started from the saved one (its Adam step count continued)
    steps = [s["step"] for s in trainer.d_optimizer.state_dict()["state"].values()]
    saved = [s["step"] for s in ckpt["distill"]["d_optimizer"]["state"].values()]
    assert all(float(a) > float(b) for a, b in zip(steps, saved))


# -- cascades ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", regkit.list_models())
def test_every_model_cascades(name):
    one = regkit.create_model(name, **SMALL_KWARGS.get(name, {}))
    two = regkit.create_model(name, cascades=2, **SMALL_KWARGS.get(name, {}))
    assert isinstance(two, Cascade) and len(two.stages) == 2
    assert two.num_parameters() == 2 * one.num_parameters()
    assert two.regkit_spec == {"name": name, "kwargs": {"cascades": 2, **SMALL_KWARGS.get(name, {})}}
    x = torch.rand(1, 1, 33, 35, 37)
    with torch.no_grad():
        out = two(x, torch.rand_like(x))
    assert out.flow.shape == (1, 3, 33, 35, 37) and len(out.stage_fields) == 2
    assert torch.isfinite(out.warped).all()


def _fixed_stage(flow):
    """A stage that always predicts ``flow`` (whatever it is shown)."""
    stage = regkit.create_model("vxm1", ndim=2)
    stage.forward = lambda moving, fixed: RegistrationOutput(warped=warp(moving, flow), flow=flow)
    return stage


def test_cascade_of_integer_shifts_equals_warping_twice():
    f1 = torch.zeros(1, 2, 24, 24)
    f1[:, 0], f1[:, 1] = 2.0, -1.0
    f2 = torch.zeros(1, 2, 24, 24)
    f2[:, 0], f2[:, 1] = -3.0, 4.0
    cascade = Cascade([_fixed_stage(f1), _fixed_stage(f2)])
    moving = torch.rand(1, 1, 24, 24)
    out = cascade(moving, torch.rand_like(moving))
    assert torch.equal(out.flow, f1 + f2)
    twice = warp(warp(moving, f1), f2)
    inner = (slice(None), slice(None), slice(4, -4), slice(5, -5))  # away from content shifted in from outside
    # integer shifts resample at voxel centres: equal up to the float32 round-off of grid_sample
    assert torch.allclose(out.warped[inner], twice[inner], atol=1e-5, rtol=0)
    assert torch.allclose(out.warped[inner], moving[..., 3:-5, 8:-2], atol=1e-5, rtol=0)  # net shift (-1, 3)


def test_cascade_of_smooth_fields_composes_them():
    """Composed flow == second + first(x + second); warping once by it ~= warping twice."""
    torch.manual_seed(0)
    grid = torch.stack(torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij"))
    f1 = (2.0 * torch.sin(5 * grid[[1, 0]] + 0.5)).unsqueeze(0)
    f2 = (1.5 * torch.cos(4 * grid + 1.0)).unsqueeze(0)
    cascade = Cascade([_fixed_stage(f1), _fixed_stage(f2)])
    moving = torch.sin(6 * grid[0] + 2 * grid[1]).view(1, 1, 32, 32)
    out = cascade(moving, moving)
    assert torch.equal(out.flow, compose_flows(f1, f2))
    twice = warp(warp(moving, f1), f2)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    err = (out.warped - twice)[inner].abs().max()
    assert err < 0.015, err  # interpolation error only [measured 0.008]
    assert (warp(moving, f1 + f2) - twice)[inner].abs().max() > 10 * err  # adding the flows would be wrong [0.11]


def test_cascade_regularises_each_stage_and_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = regkit.create_model("vxm1", ndim=2, cascades=3)
    for stage in model.stages:
        with torch.no_grad():
            stage.flow_head.weight.normal_(0, 0.05)
    x = torch.rand(1, 1, 32, 32)
    out = model(x, torch.rand_like(x))
    loss = regkit.losses.CompositeLoss({"grad": {"weight": 1.0}})
    grad = regkit.create_loss("grad")
    value = loss(out, {"fixed": x}).terms["grad"]
    assert torch.allclose(value, sum(grad(f) for f in out.stage_fields))
    assert not torch.allclose(value, grad(out.flow))
    path = tmp_path / "cascade.ckpt"
    save_checkpoint(path, {"model": model_spec(model), "state_dict": model.state_dict()})
    again = load_model(path)
    assert isinstance(again, Cascade) and len(again.stages) == 3
    assert torch.equal(again(x, x).flow, model(x, x).flow)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_cascade_count(bad):
    with pytest.raises(InputError, match="cascades must be an integer >= 1"):
        regkit.create_model("vxm1", cascades=bad)
