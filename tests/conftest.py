"""Shared fixtures: tiny synthetic data, Hydra composition, the optional real-data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
REAL_DATA = Path(os.environ.get("REGKIT_REAL_DATA", ROOT.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/real`` (or $REGKIT_REAL_DATA); the test is skipped when it is absent."""
    if not (REAL_DATA / "common_160x192x224").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A session-wide folder for generated synthetic data (shared between tests)."""
    return tmp_path_factory.mktemp("generated")


def compose(overrides=(), output_dir=None, data_dir=None):
    """The run config exactly as ``python train.py <overrides>`` composes it."""
    from hydra import compose as hydra_compose, initialize_config_dir

    extra = []
    if output_dir is not None:
        extra.append(f"paths.output_dir={output_dir}")
    if data_dir is not None:
        extra.append(f"paths.data_dir={data_dir}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides) + extra)


TINY_DATA = [
    "dataset.shape=[32,32,32]", "dataset.n_train=3", "dataset.n_val=1", "dataset.n_test=0", "dataset.batch_size=1",
    "trainer.device=cpu", "callbacks.progress.enabled=false",
]
