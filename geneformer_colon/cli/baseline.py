"""A baseline on the same split and metrics as training:
`geneformer-colon-baseline experiment=colon6 [baseline=naive_bayes|logreg|pca_knn] [overrides]`.

With `cv=lodo` every donor is the test donor once; with `-m` (a sweep), a job that fails is
recorded in the sweep's summary and the sweep goes on.
"""

from __future__ import annotations

from omegaconf import DictConfig

from geneformer_colon.cli.hydra_app import hydra_entry, run_job
from geneformer_colon.common.console import report_input_errors
from geneformer_colon.jobs.baseline import baseline_config, run_baseline


@hydra_entry("baseline")
@report_input_errors
def main(cfg: DictConfig) -> float:
    return run_job(run_baseline, baseline_config(cfg))


if __name__ == "__main__":
    main()
