"""Fine-tuning: ``init_from=<checkpoint>`` starts a run from another run's weights (same model and
arguments, a fresh optimizer and epoch 0); another model is refused with one line naming both."""
import pytest
import torch

from conftest import TINY_DATA, compose
from regkit.checkpoint import init_weights, load_checkpoint
from regkit.errors import InputError
from regkit.experiment import build, train
from regkit.models import create_model

RUN = TINY_DATA + ["dataset.shape=[16,16,16]", "trainer.max_epochs=1", "~logger", "callbacks.validation=null",
                   "callbacks.checkpoint.monitor=null"]


@pytest.fixture(scope="module")
def source(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("source")
    train(compose(RUN + ["seed=1"], output_dir=out, data_dir=data_dir))
    return out / "checkpoints" / "last.ckpt"


def test_init_from_starts_from_the_weights_and_not_the_state(source, tmp_path, data_dir):
    cfg = compose(RUN + [f"init_from={source}"], output_dir=tmp_path, data_dir=data_dir)
    fresh = build(cfg)["model"]
    data = init_weights(fresh, source)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in data["state_dict"].items())
    # through train(): with a learning rate of 0 the fine-tuned run ends with exactly the source's weights
    # (and a run from scratch does not), counting its own steps from 0
    out = tmp_path / "tuned"
    train(compose(RUN + [f"init_from={source}", "optimizer.lr=0"], output_dir=out, data_dir=data_dir))
    tuned = load_checkpoint(out / "checkpoints" / "last.ckpt")
    src = load_checkpoint(source)
    assert all(torch.equal(tuned["state_dict"][k], v) for k, v in src["state_dict"].items())
    assert tuned["global_step"] == src["global_step"] and tuned["epoch"] == 1
    scratch = tmp_path / "scratch"
    train(compose(RUN + ["optimizer.lr=0"], output_dir=scratch, data_dir=data_dir))
    other = load_checkpoint(scratch / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(not torch.equal(other[k], v) for k, v in src["state_dict"].items())


def test_init_from_another_model_is_refused_in_one_line(source):
    with pytest.raises(InputError, match=r"init_from needs the same model: the checkpoint holds vxm1 .* this run "
                                         r"builds lkunet") as err:
        init_weights(create_model("lkunet", start_channels=4), source)
    assert "\n" not in str(err.value)
