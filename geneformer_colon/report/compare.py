"""Runs side by side: their metrics and the config that differs, per-donor figures, a paired test, plots.

Runs are read through :mod:`geneformer_colon.rundir`: a run directory, a cross-validated run
(its figures are the means over its folds, with their standard deviation), or a sweep root
holding runs at any depth. Nothing here needs W&B.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.stats import wilcoxon

from geneformer_colon.config import differing_keys, display, flatten
from geneformer_colon.figures import save_figure
from geneformer_colon.io import atomic_path
from geneformer_colon.names import EVAL_SPLITS, METRICS, TEST
from geneformer_colon.rundir import Run, find_runs, read_run
from geneformer_colon.tables import markdown_table, print_table

log = logging.getLogger(__name__)

METRIC_COLUMNS = [f"{split}_{metric}" for split in EVAL_SPLITS for metric in METRICS]
SPREAD_COLUMNS = [f"{split}_macro_f1_sd" for split in EVAL_SPLITS]
TABLE_FILE = "comparison.md"
EPOCH_PLOT = "val_macro_f1_per_epoch.png"
RECALL_PLOT = "recall_per_class.png"
PAIRED_METRIC = "macro_f1"
ALPHA = 0.05


def common_base(runs: Sequence[Path]) -> Path:
    """The deepest folder holding all the runs (each run's path is shown relative to it)."""
    try:
        return Path(os.path.commonpath([run.parent for run in runs]))
    except ValueError:  # different drives
        return Path.cwd()


def run_labels(runs: Sequence[Run]) -> list[str]:
    base = common_base([run.path for run in runs])
    return [run.path.relative_to(base).as_posix() if run.path.is_relative_to(base) else str(run.path) for run in runs]


def ranked(runs: Iterable[Run]) -> list[Run]:
    """Best val macro F1 (a CV run: its mean) first; runs without final metrics last, in the order given."""
    return sorted(runs, key=lambda run: -run.headline("val", "macro_f1") if run.finished else np.inf)


def comparison_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """One row a run, in the order given: status, best epoch (folds for a CV run), final metrics, and
    the config that differs."""
    keys = differing_keys([run.config for run in runs])
    rows = []
    for label, run in zip(run_labels(runs), runs):
        row: dict[str, Any] = {"run": label, "status": run.status,
                               "best_epoch": run.metrics.get("best_epoch") if run.finished and not run.is_cv else None,
                               "folds": len(run.cv.get("folds", [])) if run.is_cv else None}
        for split in EVAL_SPLITS:
            for metric in METRICS:
                row[f"{split}_{metric}"] = run.headline(split, metric) if run.finished else np.nan
            row[f"{split}_macro_f1_sd"] = run.spread(split, "macro_f1")
        flat = flatten(run.config)
        row.update({key: display(flat[key]) if key in flat else "-" for key in keys})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["run", "status", "best_epoch", "folds", *METRIC_COLUMNS, *SPREAD_COLUMNS,
                                        *keys])
    frame = frame.astype({"best_epoch": "Int64", "folds": "Int64"})
    return frame.drop(columns=[column for column in ("folds", *SPREAD_COLUMNS) if frame[column].isna().all()])


def column_title(column: str) -> str:
    split, _, metric = column.partition("_")
    if split in EVAL_SPLITS and metric in METRICS:
        return f"{split} {METRICS[metric]}"
    if split in EVAL_SPLITS and metric == "macro_f1_sd":
        return f"{split} macro F1 sd"
    return column.replace("_", " ") if column in ("best_epoch",) else column


# ---- per donor, and the paired test ----


def per_donor(run: Run, metric: str = PAIRED_METRIC) -> dict[str, float]:
    """Test ``metric`` by donor: a CV run's folds, else the test split's breakdown, else its one donor."""
    if run.is_cv:
        return {fold["test_donor"]: fold[TEST][metric] for fold in run.cv.get("folds", [])}
    test = run.metrics.get(TEST, {})
    if test.get("by_donor"):
        return {donor: values[metric] for donor, values in test["by_donor"].items() if values.get(metric) is not None}
    donors = run.donors(TEST)
    if run.finished and len(donors) == 1:
        return {donors[0]: test[metric]}
    return {}


def per_cell_type(run: Run, metric: str = PAIRED_METRIC) -> dict[str, float]:
    """Test ``metric`` by cell type (where the test split holds several): a CV run's mean over its folds."""
    if run.is_cv:
        scores: dict[str, list[float]] = defaultdict(list)
        for fold in run.cv.get("folds", []):
            for cell_type, value in fold.get(f"test_{metric}_by_cell_type", {}).items():
                scores[cell_type].append(value)
        return {cell_type: float(np.mean(values)) for cell_type, values in scores.items()}
    groups = run.metrics.get(TEST, {}).get("by_cell_type") or {}
    return {cell_type: values[metric] for cell_type, values in groups.items() if values.get(metric) is not None}


BREAKDOWNS = {"donor": per_donor, "cell type": per_cell_type}


def breakdown_rows(runs: Sequence[Run], per_group: Callable[[Run], dict[str, float]]) -> list[list[Any]]:
    """A row a group (donor or cell type) any run was scored on, a column a run; empty below two groups."""
    values = [per_group(run) for run in runs]
    groups = sorted({group for scores in values for group in scores})
    return [[group, *(scores.get(group) for scores in values)] for group in groups] if len(groups) > 1 else []


@dataclass(frozen=True)
class PairedComparison:
    """``other`` against ``reference`` on the donors both were tested on."""

    reference: str
    other: str
    donors: list[str]
    reference_values: list[float]
    other_values: list[float]

    @property
    def differences(self) -> np.ndarray:
        return np.asarray(self.other_values) - np.asarray(self.reference_values)

    def test(self) -> tuple[float | None, str]:
        """The two-sided Wilcoxon signed-rank p-value across donors, and a plain sentence about it."""
        n = len(self.donors)
        nonzero = int(np.count_nonzero(self.differences))
        smallest = 2.0 / 2**nonzero if nonzero else 1.0
        if nonzero == 0:
            return None, f"the two runs score the same on all {n} donors: nothing to test"
        p = float(wilcoxon(self.differences, zero_method="wilcox", alternative="two-sided").pvalue)
        sentence = (f"Wilcoxon signed-rank across {n} donors ({nonzero} with a difference): p = {p:.3f}; "
                    f"mean difference {self.differences.mean():+.3f}")
        if smallest > ALPHA:
            sentence += (f". With {nonzero} donors no outcome can reach p < {ALPHA} (the smallest possible p is "
                         f"{smallest:.3f}): read the per-donor differences, not the p-value")
        return p, sentence


def paired_comparisons(runs: Sequence[Run], labels: Sequence[str]) -> list[PairedComparison]:
    """Each run against the best-ranked run with per-donor figures, on the donors they share (two at least)."""
    scored = [(label, per_donor(run)) for label, run in zip(labels, runs)]
    scored = [(label, values) for label, values in scored if len(values) >= 2]
    if len(scored) < 2:
        return []
    (reference, reference_values), others = scored[0], scored[1:]
    pairs = []
    for label, values in others:
        donors = [donor for donor in reference_values if donor in values]
        if len(donors) >= 2:
            pairs.append(PairedComparison(reference, label, donors, [reference_values[d] for d in donors],
                                          [values[d] for d in donors]))
    return pairs


def paired_markdown(pair: PairedComparison) -> str:
    rows = [[donor, a, b, b - a] for donor, a, b in zip(pair.donors, pair.reference_values, pair.other_values)]
    rows.append(["mean", np.mean(pair.reference_values), np.mean(pair.other_values), pair.differences.mean()])
    table = markdown_table(["test donor", pair.reference, pair.other, "difference"], rows)
    return f"### {pair.other} vs {pair.reference}: test macro F1 by donor\n\n{table}\n{pair.test()[1]}.\n"


# ---- output ----


def frame_markdown(frame: pd.DataFrame) -> str:
    return markdown_table([column_title(c) for c in frame.columns], frame.itertuples(index=False))


@dataclass(frozen=True)
class Comparison:
    """The runs, best val macro F1 first; their table (one row a run); each run paired with the best."""

    runs: list[Run]
    frame: pd.DataFrame
    pairs: list[PairedComparison]


def print_comparison(comparison: Comparison) -> None:
    frame = comparison.frame
    numeric = [column_title(c) for c in (*METRIC_COLUMNS, *SPREAD_COLUMNS)]
    print_table(f"{len(frame)} runs, best val macro F1 first", [column_title(c) for c in frame.columns],
                frame.itertuples(index=False), numeric=numeric)
    labels = list(frame["run"])
    for name, per_group in BREAKDOWNS.items():
        rows = breakdown_rows(comparison.runs, per_group)
        if rows:
            print_table(f"test macro F1 by {name}", [name, *labels], rows, numeric=labels)
    for pair in comparison.pairs:
        rows = [[d, a, b, b - a] for d, a, b in zip(pair.donors, pair.reference_values, pair.other_values)]
        print_table(f"{pair.other} vs {pair.reference}: test macro F1 by donor",
                    ["test donor", pair.reference, pair.other, "difference"], rows,
                    numeric=[pair.reference, pair.other, "difference"])
        print(pair.test()[1])


def plot_epochs(runs: Sequence[Run], labels: Sequence[str], path: Path) -> None:
    """Val macro F1 per epoch, one line a run; a run without epochs (the baseline, a CV run) as a dashed level."""
    figure = Figure(figsize=(7, 4))
    axis = figure.subplots()
    last_epoch = 0
    for label, run in zip(labels, runs):
        donors = ", ".join(run.donors("val"))
        name = f"{label} (val {donors})" if donors else label
        if run.epochs:
            epochs = [epoch["epoch"] for epoch in run.epochs]
            last_epoch = max(last_epoch, *epochs)
            axis.plot(epochs, [epoch["val/macro_f1"] for epoch in run.epochs], marker="o", label=name)
        elif run.finished:
            what = "mean over folds" if run.is_cv else "no epochs"
            axis.axhline(run.headline("val", "macro_f1"), linestyle="--", color="grey", label=f"{label} ({what})")
    axis.set_xlabel("epoch")
    axis.set_ylabel("val macro F1")
    axis.set_xlim(-0.5, last_epoch + 0.5)
    axis.set_ylim(0, 1)
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_title("validation macro F1 per epoch")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(figure, path)


def plot_recall(runs: Sequence[Run], labels: Sequence[str], path: Path) -> None:
    """Per-class recall on the val and test donors, grouped bars (one group a class, one bar a run), and chance."""
    finished = [(label, run) for label, run in zip(labels, runs) if run.finished]
    classes = list(dict.fromkeys(name for _, run in finished for name in run.class_names))
    figure = Figure(figsize=(len(EVAL_SPLITS) * (1 + 1.5 * max(len(classes), 1)), 4))
    axes = figure.subplots(1, len(EVAL_SPLITS), sharey=True)
    width = 0.8 / max(len(finished), 1)
    for axis, split in zip(axes, EVAL_SPLITS):
        for number, (label, run) in enumerate(finished):
            recalls = [run.headline(split, f"recall/{name}") for name in classes]
            axis.bar(np.arange(len(classes)) + (number - (len(finished) - 1) / 2) * width, recalls, width, label=label)
        if classes:
            axis.axhline(1 / len(classes), color="grey", linestyle="--", linewidth=1,
                         label=f"chance (1/{len(classes)})" if split == EVAL_SPLITS[-1] else None)
        axis.set_xticks(range(len(classes)), classes, rotation=30 if len(classes) > 4 else 0)
        axis.set_ylim(0, 1)
        axis.set_title(f"recall per class, {split}")
    axes[0].set_ylabel("recall")
    if finished:
        axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(figure, path)


def comparison_markdown(frame: pd.DataFrame, runs: Sequence[Run], pairs: Sequence[PairedComparison]) -> str:
    parts = ["# Run comparison\n", frame_markdown(frame)]
    for name, per_group in BREAKDOWNS.items():
        rows = breakdown_rows(runs, per_group)
        if rows:
            parts += [f"\n## Test macro F1 by {name}\n", markdown_table([name, *frame["run"]], rows)]
    if pairs:
        parts += ["\n## Paired comparison across donors\n", *(paired_markdown(pair) for pair in pairs)]
    return "\n".join(parts)


def compare_runs(paths: Iterable[str | os.PathLike[str]], out_dir: str | os.PathLike[str] | None = None
                 ) -> Comparison:
    """Compare the runs in and under ``paths`` (best val macro F1 first); write comparison.md and the two
    plots to ``out_dir``, by default the deepest folder holding all the runs."""
    runs = ranked(read_run(path) for path in find_runs(paths))
    frame = comparison_frame(runs)
    labels = list(frame["run"])
    pairs = paired_comparisons(runs, labels)
    out = Path(out_dir) if out_dir is not None else common_base([run.path for run in runs])
    with atomic_path(out / TABLE_FILE) as tmp:
        tmp.write_text(comparison_markdown(frame, runs, pairs))
    plot_epochs(runs, labels, out / EPOCH_PLOT)
    plot_recall(runs, labels, out / RECALL_PLOT)
    log.info("comparison written to %s (%s, %s, %s)", out, TABLE_FILE, EPOCH_PLOT, RECALL_PLOT)
    return Comparison(runs, frame, pairs)

