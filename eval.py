"""Evaluate a run's best checkpoint on other cells: `python eval.py run_dir=outputs/colon6 data.test_donors=[KUL21]`.

Any override in Hydra's grammar applies on top of the run's saved config, group overrides
included (`data=h5ad data.source.path=other.h5ad ...`); `name=...` names the results folder
(`<run_dir>/eval/<name>/`); `allow_training_donors=true` lets a training donor be a test donor.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from geneformer_colon.console import report_input_errors
from geneformer_colon.retest import parse_arguments, run_evaluation

CONF_DIR = Path(__file__).resolve().parent / "conf"


@report_input_errors
def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_evaluation(**parse_arguments(argv), conf_dir=CONF_DIR)


if __name__ == "__main__":
    main(sys.argv[1:])
