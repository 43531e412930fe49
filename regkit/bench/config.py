"""Run configs for benchmarks, composed exactly as ``python train.py <overrides>`` composes them,
so that a benchmark builds its trainer, model, loss and optimizer the way training does."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

from hydra import compose as hydra_compose, initialize_config_dir
from omegaconf import DictConfig

from regkit.errors import MissingFileError

# configs/ beside the package: benchmarks run from a source checkout
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def compose(overrides: Sequence[str] = (), config_dir: Union[str, Path] = CONFIG_DIR) -> DictConfig:
    """The ``train`` config with Hydra ``overrides`` (``model=vxm2``, ``trainer.precision=bf16``,
    ...). Outside a Hydra app ``paths.output_dir`` has no value: give it as an override."""
    config_dir = Path(config_dir).resolve()
    if not (config_dir / "train.yaml").is_file():
        raise MissingFileError(f"{config_dir / 'train.yaml'}: no run config there (benchmarks need a source checkout)")
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))
