"""Tables of runs' figures, with one set of column titles: one row a run (compare, the sweep summary,
history) and one row a donor or cell type of a split (a run's summary, history)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from geneformer_colon.common.names import CALIBRATED_METRICS, EVAL_SPLITS, METRICS, TEST, TRUST_METRICS, column
from geneformer_colon.common.text_tables import markdown_table
from geneformer_colon.runs.reading import Run

SPREAD = "sd"  # the qualifier of a CV run's standard deviation over its folds
SPREAD_METRIC = "macro_f1"
METRIC_COLUMNS = [column(split, metric) for split in EVAL_SPLITS for metric in METRICS]
SPREAD_COLUMNS = [column(split, SPREAD_METRIC, SPREAD) for split in EVAL_SPLITS]
# The test donors' calibration and abstention figures (lower is better); absent from runs made before them.
TRUST_COLUMNS = [column(TEST, metric) for metric in (*TRUST_METRICS, *CALIBRATED_METRICS)]
RUN_COLUMNS = ["status", "best_epoch", "folds", *METRIC_COLUMNS, *SPREAD_COLUMNS, *TRUST_COLUMNS]
# Columns a table leaves out when no row has a value (no CV run among its runs, no run with calibration figures).
OPTIONAL_COLUMNS = ("folds", *SPREAD_COLUMNS, *TRUST_COLUMNS)
INTEGER_COLUMNS = ("best_epoch", "folds")

TITLES = {
    "best_epoch": "best epoch",
    "run_dir": "run dir",
    **{column(split, metric): f"{split} {title}" for split in EVAL_SPLITS for metric, title in METRICS.items()},
    **{column(split, SPREAD_METRIC, SPREAD): f"{split} {METRICS[SPREAD_METRIC]} {SPREAD}" for split in EVAL_SPLITS},
    **{column(TEST, metric): f"{TEST} {title}" for metric, title in (TRUST_METRICS | CALIBRATED_METRICS).items()},
}


def column_title(name: str) -> str:
    """The title every table of runs gives a column (a config key keeps its own name)."""
    return TITLES.get(name, name)


def run_row(run: Run | None, status: str | None = None) -> dict[str, Any]:
    """A run's status, best epoch (a CV run: its folds instead) and headline figures (a CV run: the means
    over its folds, with the standard deviation of macro F1); NaN where a run has no final figures.
    ``run`` None: a run not read (a sweep job that failed), with its ``status``."""
    finished = run is not None and run.finished
    row: dict[str, Any] = {
        "status": status or (run.status if run is not None else None),
        "best_epoch": run.metrics.get("best_epoch") if finished and not run.is_cv else None,
        "folds": len(run.cv.get("folds", [])) if run is not None and run.is_cv else None,
    }
    for split in EVAL_SPLITS:
        row.update({column(split, metric): run.headline(split, metric) if finished else np.nan for metric in METRICS})
        row[column(split, SPREAD_METRIC, SPREAD)] = run.spread(split, SPREAD_METRIC) if finished else np.nan
    row.update({name: run.headline(TEST, metric) if finished else np.nan
                for name, metric in zip(TRUST_COLUMNS, (*TRUST_METRICS, *CALIBRATED_METRICS))})
    return row


def runs_frame(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], drop_empty: bool = True) -> pd.DataFrame:
    """One row a run in ``columns`` order (integer columns nullable); the optional columns no run fills left
    out unless ``drop_empty`` is False."""
    frame = pd.DataFrame(list(rows), columns=list(columns))
    frame = frame.astype({name: "Int64" for name in INTEGER_COLUMNS if name in frame.columns})
    if drop_empty:
        frame = frame.drop(columns=[name for name in OPTIONAL_COLUMNS if name in frame and frame[name].isna().all()])
    return frame


def frame_markdown(frame: pd.DataFrame) -> str:
    """A runs' table as markdown, under the shared column titles."""
    return markdown_table([column_title(name) for name in frame.columns], frame.itertuples(index=False))


def group_rows(groups: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """A split's breakdown (``by_donor`` or ``by_cell_type`` of metrics.json) as headers (cells and the
    headline metrics' titles) and a row a group."""
    return ["cells", *METRICS.values()], [[group, values["cells"], *(values.get(metric) for metric in METRICS)]
                                          for group, values in groups.items()]
