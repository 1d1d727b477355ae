"""Train a Geneformer cell classifier: `python train.py experiment=colon6 [overrides]`.

With `cv=lodo` every donor is the test donor once; with `-m` (a sweep), a job that fails is
recorded in the sweep's summary and the sweep goes on.
"""

from __future__ import annotations

from omegaconf import DictConfig

from geneformer_colon.command_line import hydra_entry
from geneformer_colon.console import report_input_errors
from geneformer_colon.entry import run_job
from geneformer_colon.fine_tune import train


@hydra_entry("train")
@report_input_errors
def main(cfg: DictConfig) -> float:
    return run_job(train, cfg)


if __name__ == "__main__":
    main()
