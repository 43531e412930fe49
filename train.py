"""Train a registration network: ``python train.py [group=option ...] [key=value ...]``.

Only composes the config and hands it to :func:`regkit.experiment.train`; see configs/train.yaml.
"""
import hydra
from omegaconf import DictConfig

from regkit.cli import exit_on_user_error
from regkit.experiment import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric", "val/dice"), float("nan"))


if __name__ == "__main__":
    main()
