"""Registries: names equal config file names, duplicates raise, unknown names explain; options and
their defaults in one place; a model is one registered function plus one YAML."""
import inspect
import sys

import pytest
from omegaconf import OmegaConf
from torch import nn

import regkit
from regkit.losses import LOSSES
from regkit.models import MODELS, ModelInfo, RegistrationModel
from regkit.models.base import conv_nd, init_flow_head
from regkit.registry import Registry, keyword_options
from tests.conftest import CONFIG_DIR, TINY_DATA, compose
from tests.test_models import assert_same_model, check_against_metadata, load_script


def test_unknown_model_lists_valid_names_and_closest():
    with pytest.raises(ValueError) as err:
        regkit.create_model("vxm3")
    msg = str(err.value)
    assert "Unknown model 'vxm3'" in msg and "Did you mean" in msg
    for name in regkit.list_models():
        assert name in msg


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError) as err:
        regkit.create_loss("lncc_fats")
    assert "Did you mean 'lncc_fast'" in str(err.value)
    assert "lncc_group" in str(err.value)


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match=r"Unknown model 'vxm1' option 'enc_channel'\. Did you mean 'enc_channels'\?"):
        regkit.create_model("vxm1", enc_channel=(8, 16))
    with pytest.raises(ValueError, match=r"Unknown loss 'lncc' option 'windw'\. Did you mean 'window'\? Valid: eps, window\."):
        regkit.create_loss("lncc", windw=3)


def test_duplicate_registration_raises():
    reg = Registry("widget")

    @reg.register
    def a():
        return object()

    with pytest.raises(ValueError, match="already registered"):
        reg.register(a, name="a")


def test_models_must_be_registered_with_their_metadata():
    with pytest.raises(TypeError, match=r"info=ModelInfo"):
        Registry("model", info_type=ModelInfo).register(lambda: None, name="bare")
    with pytest.raises(ValueError, match="reference_note"):
        ModelInfo("x", "", "", params=10, reference_params=12)


@pytest.mark.parametrize("group,names", [("model", regkit.list_models), ("loss", regkit.list_losses)])
def test_config_files_match_registry(group, names):
    files = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
    assert files == names()


@pytest.mark.parametrize("name", regkit.list_models())
def test_model_config_targets_its_registered_function(name):
    target = OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml").get("_target_")
    module, attr = target.rsplit(".", 1)
    assert getattr(sys.modules[module], attr) is MODELS.get(name)


@pytest.mark.parametrize("name", regkit.list_losses())
def test_loss_config_targets_its_registered_class(name):
    term = OmegaConf.load(CONFIG_DIR / "loss" / f"{name}.yaml").terms[name].loss
    module, attr = term._target_.rsplit(".", 1)
    assert getattr(sys.modules[module], attr) is LOSSES.entry(name).builds


def test_factory_records_spec():
    model = regkit.create_model("vxm1", ndim=2)
    assert model.regkit_spec == {"name": "vxm1", "kwargs": {"ndim": 2}}


# ----------------------------------------------------------------------------- options and defaults
def test_options_follow_kwargs_to_the_base_class():
    from regkit.models.lkunet import LKUNet

    options, closed = keyword_options(LKUNet)
    empty = inspect.Parameter.empty
    assert closed and options == {"start_channels": empty, "large_kernel": empty, "ndim": 3, "in_channels": 1,
                                  "diffeomorphic": False, "int_steps": 7, "int_downsize": 1, "transformer": None}
    # a registered variant: its registration's defaults over the class's, plus the shared cascades
    assert MODELS.options("lkunet_diff") == {**options, "cascades": 1, "start_channels": 8, "large_kernel": 5,
                                             "diffeomorphic": True}
    assert MODELS.defaults("lkunet16") == {"start_channels": 16, "large_kernel": 5}
    assert LOSSES.options("grad") == {"penalty": "l2"} and LOSSES.options("bending") == {}


def test_config_default_resolves_from_the_code_and_explains_mistakes():
    cfg = OmegaConf.create({
        "term": {"_target_": "regkit.losses.lncc.LNCCFast", "window": "${regkit.default:}"},
        "model": {"_target_": "regkit.models.lkunet.lkunet16", "start_channels": "${regkit.default:}",
                  "cascades": "${regkit.default:}"},
        "typo": {"_target_": "regkit.losses.lncc.LNCC", "windw": "${regkit.default:}"},
        "required": {"_target_": "regkit.models.lkunet.LKUNet", "start_channels": "${regkit.default:}"},
        "orphan": {"window": "${regkit.default:}"},
    })
    assert cfg.term.window == 9 and cfg.model.start_channels == 16 and cfg.model.cascades == 1
    with pytest.raises(Exception, match=r"Unknown regkit.losses.lncc.LNCC option 'windw'\. Did you mean 'window'"):
        cfg.typo.windw
    with pytest.raises(Exception, match=r"option 'start_channels' has no default"):
        cfg.required.start_channels
    with pytest.raises(Exception, match=r"needs a _target_"):
        cfg.orphan.window


# ----------------------------------------------------------------------------- a model is one function + one YAML
class Toy(RegistrationModel):
    """The smallest registration network: one conv of ``width`` channels + LeakyReLU, a flow head."""

    def __init__(self, width: int, **kwargs) -> None:
        super().__init__(**kwargs)
        conv = conv_nd(self.ndim)
        self.body = nn.Sequential(conv(2 * self.in_channels, width, 3, padding=1), nn.LeakyReLU(0.2))
        self.flow_head = conv(width, self.ndim, 3, padding=1)
        init_flow_head(self.flow_head)

    def predict_field(self, x):
        return self.flow_head(self.body(x))


# 3-D, one channel, width 4: (2*27*4 + 4) + (4*27*3 + 3) parameters.
TOY_INFO = ModelInfo("toy: one conv of `width` channels and a flow head", paper="", source="tests/test_registry.py",
                     params=2 * 27 * 4 + 4 + 4 * 27 * 3 + 3, reference_params=None,
                     reference_note="none: a test model")
TOY_YAML = f"""_target_: {__name__}.toy
ndim: ${{regkit.default:}}
in_channels: ${{regkit.default:}}
diffeomorphic: ${{regkit.default:}}
int_steps: ${{regkit.default:}}
int_downsize: ${{regkit.default:}}
transformer: ${{transformer}}
cascades: ${{regkit.default:}}
"""


@pytest.fixture
def toy_configs(monkeypatch, tmp_path):
    """Adds a model the way a contributor would, and nothing else: one registered function (in
    this module) and one YAML (in a config folder of its own). Both end with the test."""
    monkeypatch.setattr(MODELS, "_entries", dict(MODELS._entries))

    @MODELS.register(defaults=dict(width=4), info=TOY_INFO)
    def toy(**kwargs) -> Toy:
        return Toy(**kwargs)

    monkeypatch.setattr(sys.modules[__name__], "toy", toy, raising=False)
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "model" / "toy.yaml").write_text(TOY_YAML)
    return tmp_path / "configs"


def test_a_model_is_one_registered_function_and_one_yaml(toy_configs, tmp_path, data_dir):
    from hydra.utils import instantiate

    from regkit.experiment import train
    from regkit.checkpoint import load_checkpoint, load_model

    # built and checked against its metadata like every model (tests/test_models.py)
    assert "toy" in regkit.list_models()
    check_against_metadata("toy")
    assert regkit.create_model("toy", width=8).num_parameters() > TOY_INFO.params  # the one rule: overridable

    # composed by name from its YAML, built as the registry builds it, trained one step, and
    # rebuilt from the checkpoint through the registry
    out = tmp_path / "run"
    overrides = TINY_DATA + ["model=toy", f"hydra.searchpath=[file://{toy_configs}]", "loss=mse",
                             "trainer.max_epochs=1", "trainer.limit_train_batches=1", "~logger"]
    cfg = compose(overrides, output_dir=out, data_dir=data_dir)
    assert_same_model(instantiate(cfg.model), regkit.create_model("toy"))
    train(cfg)
    ckpt = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 1 and ckpt["model"]["name"] == "toy"
    assert isinstance(load_model(out / "checkpoints" / "last.ckpt"), Toy)

    # listed by the model table with its metadata and computed numbers, and benchmarked by default
    model_table = load_script("model_table")
    assert "toy" in model_table.model_names()
    (row,) = model_table.rows(["toy"])
    assert row[:3] == ("`toy`", TOY_INFO.description, f"{TOY_INFO.params:,}")
    assert row[4] == TOY_INFO.reference_note
    # multiply-adds: two 3x3x3 convs per voxel of the (17, 20, 23) grid padded to 32^3 (FLOPs / 2)
    assert model_table.multiply_adds(regkit.create_model("toy"), (17, 20, 23)) == {
        "aten.convolution": 32 ** 3 * 27 * (2 * 4 + 4 * 3)}
    (provenance,) = model_table.provenance_rows(["toy"])
    assert provenance == ("`toy`", "`width=4`", "-", "tests/test_registry.py")
    assert "toy" in load_script("bench_models").default_models()

