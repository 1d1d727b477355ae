"""Train a Geneformer cell classifier: `python train.py experiment=colon6 [overrides]`."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from geneformer_colon.entry import report_input_errors
from geneformer_colon.training import run_training


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
@report_input_errors
def main(cfg: DictConfig) -> float:
    with open_dict(cfg):
        cfg.paths.run_dir = HydraConfig.get().runtime.output_dir
    return run_training(cfg)


if __name__ == "__main__":
    main()
