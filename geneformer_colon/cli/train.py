"""Train a Geneformer cell classifier: `geneformer-colon-train experiment=colon6 [overrides]`.

With `cv=lodo` every donor is the test donor once; with `-m` (a sweep), a job that fails is
recorded in the sweep's summary and the sweep goes on. With `adapt=...` the run adapts to its target donors'
unlabelled cells (`jobs/adapt.py`).
"""

from __future__ import annotations

from omegaconf import DictConfig

from geneformer_colon.cli.hydra_app import hydra_entry, run_job
from geneformer_colon.common.console import report_input_errors
from geneformer_colon.jobs.adapt import train_adapted


@hydra_entry("train")
@report_input_errors
def main(cfg: DictConfig) -> float:
    return run_job(train_adapted, cfg)


if __name__ == "__main__":
    main()
