"""Pretrain on masked genes: `geneformer-colon-pretrain [data=... model=...]`;
the best epoch goes to outputs/<run_name>/hf/.

Then fine-tune from it:
`python train.py experiment=colon6 model=pretrained model.encoder.pretrained=outputs/pretrain/hf`.
"""

from __future__ import annotations

from omegaconf import DictConfig

from geneformer_colon.cli.hydra_app import hydra_entry, run_job
from geneformer_colon.common.console import report_input_errors
from geneformer_colon.jobs.pretrain import pretrain


@hydra_entry("pretrain")
@report_input_errors
def main(cfg: DictConfig) -> float:
    return run_job(pretrain, cfg, metric="masked_accuracy")


if __name__ == "__main__":
    main()
