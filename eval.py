"""Evaluate a run's best checkpoint on any donors: `python eval.py run_dir=outputs/colon6 data.test_donors=[KUL21]`."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from geneformer_colon.entry import report_input_errors
from geneformer_colon.evaluation import run_evaluation


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
@report_input_errors
def main(cfg: DictConfig) -> None:
    overrides = [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0] not in ("run_dir", "name")]
    run_evaluation(cfg.run_dir, overrides, name=cfg.name)


if __name__ == "__main__":
    main()
