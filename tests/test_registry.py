"""Registries: names equal config file names, duplicates raise, unknown names explain."""
import pytest

import regkit
from regkit.registry import Registry
from tests.conftest import CONFIG_DIR


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


def test_duplicate_registration_raises():
    reg = Registry("widget")

    @reg.register
    def a():
        return object()

    with pytest.raises(ValueError, match="already registered"):
        reg.register(a, name="a")


@pytest.mark.parametrize("group,names", [("model", regkit.list_models), ("loss", regkit.list_losses)])
def test_config_files_match_registry(group, names):
    files = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
    assert files == names()


def test_factory_records_spec():
    model = regkit.create_model("vxm1", ndim=2)
    assert model.regkit_spec == {"name": "vxm1", "kwargs": {"ndim": 2}}
