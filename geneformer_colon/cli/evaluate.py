"""Evaluate a run's best checkpoint on other cells:
`geneformer-colon-eval run_dir=outputs/colon6 data.test_donors=[KUL21]`.

Any override in Hydra's grammar applies on top of the run's saved config, group overrides
included (`data=h5ad data.source.path=other.h5ad ...`); `name=...` names the results folder
(`<run_dir>/eval/<name>/`); `allow_training_donors=true` lets a training donor be a test donor.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from geneformer_colon.common.console import report_input_errors
from geneformer_colon.jobs.evaluate import parse_arguments, run_evaluation
from geneformer_colon.runs.config import CONF_DIR


@report_input_errors
def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_evaluation(**parse_arguments(sys.argv[1:] if argv is None else argv), conf_dir=CONF_DIR)


if __name__ == "__main__":
    main()
