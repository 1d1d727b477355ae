"""Pretrain on masked genes: `python pretrain.py [data=... model=...]`; the best epoch goes to outputs/<run_name>/hf/.

Then fine-tune from it:
`python train.py experiment=colon6 model=pretrained model.encoder.pretrained=outputs/pretrain/hf`.
"""

from __future__ import annotations

from omegaconf import DictConfig

from geneformer_colon.command_line import hydra_entry
from geneformer_colon.console import report_input_errors
from geneformer_colon.entry import run_job
from geneformer_colon.masked_gene_run import pretrain


@hydra_entry("pretrain")
@report_input_errors
def main(cfg: DictConfig) -> float:
    return run_job(pretrain, cfg, metric="masked_accuracy")


if __name__ == "__main__":
    main()
