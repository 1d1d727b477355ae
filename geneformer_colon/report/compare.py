"""Runs side by side: their metrics and the config that differs, per-donor figures, a paired test, plots.

Runs are read through :mod:`geneformer_colon.runs.reading`: a run directory, a cross-validated run
(its figures are the means over its folds, with their standard deviation), or a sweep root
holding runs at any depth. Nothing here needs W&B. Each table is built once (:class:`TextTable`)
and written to comparison.md and printed alike, narrow enough for 100 columns: a run is labelled
by its path below the folder holding all the runs, less the overrides every sweep job shares.
Each comparison goes to a folder of its own (``--out``, or a new folder named after what it compares).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from rich.console import Console
from scipy.stats import wilcoxon

from geneformer_colon.common.figures import save_figure
from geneformer_colon.common.names import EVAL_SPLITS, GROUPINGS, TEST, VAL, column, logged, per_class
from geneformer_colon.common.output_folder import output_folder
from geneformer_colon.common.text_tables import TextTable
from geneformer_colon.report.cv_summary import seed_sd
from geneformer_colon.report.run_tables import (
    METRIC_COLUMNS,
    RUN_COLUMNS,
    SPREAD_COLUMNS,
    TRUST_COLUMNS,
    column_title,
    run_row,
    runs_frame,
)
from geneformer_colon.runs.config import differing_keys, display, flatten
from geneformer_colon.runs.reading import Run, find_runs, read_run

log = logging.getLogger(__name__)

TABLE_FILE = "comparison.md"
EPOCH_PLOT = "val_macro_f1_per_epoch.png"
RECALL_PLOT = "recall_per_class.png"
DONOR_PLOT = "test_macro_f1_per_donor.png"
PAIRED_METRIC = "macro_f1"
ALPHA = 0.05
WIDTH = 100  # the columns a table is made to fit
OUT_PREFIX = "comparison_"
MAX_OUT_NAME = 100
# A sweep job's folder: its number, then its overrides separated by commas outside brackets.
JOB_FOLDER = re.compile(r"^(\d+)_(.+)$")
OVERRIDE_SEPARATOR = re.compile(r",(?![^\[]*\])")


def common_base(runs: Sequence[Path]) -> Path:
    """The deepest folder holding all the runs (each run's path is shown relative to it)."""
    try:
        return Path(os.path.commonpath([run.parent for run in runs]))
    except ValueError:  # different drives
        return Path.cwd()


def run_labels(runs: Sequence[Run]) -> list[str]:
    """Each run's path below the folder holding them all; sweep jobs' folders less the overrides all share."""
    base = common_base([run.path for run in runs])
    paths = [run.path.relative_to(base).as_posix() if run.path.is_relative_to(base) else str(run.path)
             for run in runs]
    jobs = [JOB_FOLDER.match(path.rsplit("/", 1)[-1]) for path in paths]
    if len(runs) < 2 or not all(jobs):
        return paths
    overrides = [OVERRIDE_SEPARATOR.split(job.group(2)) for job in jobs]
    shared = set(overrides[0]).intersection(*overrides[1:])
    labels = []
    for path, job, parts in zip(paths, jobs, overrides):
        kept = ",".join(part for part in parts if part not in shared)
        labels.append(path[: len(path) - len(job.group(0))] + (f"{job.group(1)}_{kept}" if kept else job.group(1)))
    return labels


def ranked(runs: Iterable[Run]) -> list[Run]:
    """Best val macro F1 (a CV run: its mean) first; runs without final metrics last, in the order given."""
    return sorted(runs, key=lambda run: -run.headline(VAL, PAIRED_METRIC) if run.finished else np.inf)


# A config node (``optimizer``, ``trainer``) of which one run alone sets more keys than this is counted in that
# run's OWN_SETTINGS cell, not given a column each: a network beside a baseline sets dozens the baseline lacks.
OWN_KEYS_SHOWN = 3
OWN_SETTINGS = "set by this run alone"


def comparison_frame(runs: Sequence[Run], labels: Sequence[str]) -> pd.DataFrame:
    """One row a run, in the order given: status, best epoch (folds for a CV run), final metrics, and
    the config that differs (a column a key; the nodes of which one run alone sets many keys counted in its
    :data:`OWN_SETTINGS` cell)."""
    flats = [flatten(run.config) for run in runs]
    keys = differing_keys([run.config for run in runs])
    owned = [[key for key in keys if key in flat and sum(key in other for other in flats) == 1] for flat in flats]
    counted = [{node: count for node, count in Counter(key.split(".")[0] for key in own).items()
                if count > OWN_KEYS_SHOWN} for own in owned]
    summarised = {key for own, nodes in zip(owned, counted) for key in own if key.split(".")[0] in nodes}
    columns = [key for key in keys if key not in summarised]
    rows = []
    for label, run, flat, nodes in zip(labels, runs, flats, counted):
        own = {OWN_SETTINGS: ", ".join(f"{node}.* ({count})" for node, count in nodes.items()) or "-"} \
            if summarised else {}
        rows.append({"run": label, **run_row(run), **{key: display(flat[key]) if key in flat else "-"
                                                       for key in columns}, **own})
    return runs_frame(rows, ["run", *RUN_COLUMNS, *columns, *([OWN_SETTINGS] if summarised else [])])


# ---- per donor, and the paired test ----


def per_donor(run: Run, metric: str = PAIRED_METRIC) -> dict[str, float]:
    """Test ``metric`` by donor: a CV run's folds, else the test split's breakdown, else its one donor."""
    if run.is_cv:
        return {fold["test_donor"]: fold[TEST][metric] for fold in run.cv.get("folds", [])}
    test = run.metrics.get(TEST, {})
    if test.get(GROUPINGS["donor"]):
        return {donor: values[metric] for donor, values in test[GROUPINGS["donor"]].items()
                if values.get(metric) is not None}
    donors = run.donors(TEST)
    if run.finished and len(donors) == 1:
        return {donors[0]: test[metric]}
    return {}


def per_cell_type(run: Run, metric: str = PAIRED_METRIC) -> dict[str, float]:
    """Test ``metric`` by cell type (where the test split holds several): a CV run's mean over its folds."""
    if run.is_cv:
        scores: dict[str, list[float]] = defaultdict(list)
        for fold in run.cv.get("folds", []):
            for cell_type, value in fold.get(column(TEST, metric, GROUPINGS["cell_type"]), {}).items():
                scores[cell_type].append(value)
        return {cell_type: float(np.mean(values)) for cell_type, values in scores.items()}
    groups = run.metrics.get(TEST, {}).get(GROUPINGS["cell_type"]) or {}
    return {cell_type: values[metric] for cell_type, values in groups.items() if values.get(metric) is not None}


BREAKDOWNS = {"donor": per_donor, "cell type": per_cell_type}


def seed_errors(run: Run, metric: str = PAIRED_METRIC) -> dict[str, float]:
    """A seeded CV run's standard error of each donor's seed-mean test ``metric`` (sd / sqrt(seeds)); {} for a
    run of one seed a fold."""
    seeds = run.cv.get("seeds") if run.is_cv else None
    if not seeds:
        return {}
    return {fold["test_donor"]: sd / np.sqrt(len(seeds)) for fold in run.cv["folds"]
            if (sd := seed_sd(fold, TEST, metric)) is not None}


def breakdown_table(runs: Sequence[Run], name: str, per_group: Callable[[Run], dict[str, float]]
                    ) -> TextTable | None:
    """Test macro F1 a group (donor or cell type) any run was scored on: a row a group, a column a run (by its
    number in the runs' table); None below two groups."""
    values = [per_group(run) for run in runs]
    groups = sorted({group for scores in values for group in scores})
    if len(groups) < 2:
        return None
    numbers = [run_number(index) for index in range(len(runs))]
    return TextTable(f"Test macro F1 by {name}", [name, *numbers],
                     [[group, *(scores.get(group) for scores in values)] for group in groups], numbers)


def run_number(index: int) -> str:
    """How the tables after the runs' table name a run: its row number there."""
    return f"#{index + 1}"


@dataclass(frozen=True)
class PairedComparison:
    """``other`` against ``reference`` on the donors both were tested on."""

    reference: str
    other: str
    donors: list[str]
    reference_values: list[float]
    other_values: list[float]
    # each donor's standard error of the difference from seed noise alone (both runs seeded), else None
    seed_errors: list[float] | None = None

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
        return p, sentence + self.seed_noise()

    def within_seed_noise(self) -> int | None:
        """How many donors differ by less than two standard errors of their seed means (None without seeds)."""
        if not self.seed_errors:
            return None
        return int(np.sum(np.abs(self.differences) < 2 * np.asarray(self.seed_errors)))

    def seed_noise(self) -> str:
        """How much of the difference seed noise alone could make ("" without seeds)."""
        within = self.within_seed_noise()
        if within is None:
            return ""
        errors = np.asarray(self.seed_errors)
        mean_error = float(np.sqrt(np.sum(errors**2)) / len(errors))
        return (f". Seed noise: {within} of {len(errors)} donors differ by less than two standard errors of their "
                f"seed means; seed noise alone gives the mean difference a standard error of {mean_error:.3f} "
                f"({abs(self.differences.mean()) / mean_error if mean_error else np.inf:.1f} of them)")


def paired_comparisons(runs: Sequence[Run], labels: Sequence[str]) -> list[PairedComparison]:
    """Each run against the best-ranked run with per-donor figures, on the donors they share (two at least)."""
    scored = [(label, per_donor(run)) for label, run in zip(labels, runs)]
    scored = [(label, values) for label, values in scored if len(values) >= 2]
    if len(scored) < 2:
        return []
    (reference, reference_values), others = scored[0], scored[1:]
    errors = {label: seed_errors(run) for label, run in zip(labels, runs)}
    pairs = []
    for label, values in others:
        donors = [donor for donor in reference_values if donor in values]
        if len(donors) >= 2:
            both = [errors[reference], errors[label]]
            noise = [float(np.hypot(both[0][d], both[1][d])) for d in donors] \
                if all(d in both[0] and d in both[1] for d in donors) else None
            pairs.append(PairedComparison(reference, label, donors, [reference_values[d] for d in donors],
                                          [values[d] for d in donors], noise))
    return pairs


def paired_table(pair: PairedComparison) -> TextTable:
    """A row a donor: the two runs' test macro F1 (columns A and B, named in the title) and B - A."""
    rows = [[donor, a, b, b - a] for donor, a, b in zip(pair.donors, pair.reference_values, pair.other_values)]
    rows.append(["mean", np.mean(pair.reference_values), np.mean(pair.other_values), pair.differences.mean()])
    return TextTable(f"Paired comparison across donors: B {pair.other} against A {pair.reference}, test macro F1 "
                     "by donor",
                     ["test donor", "A", "B", "B - A"], rows, ["A", "B", "B - A"], f"{pair.test()[1]}.")


# ---- output ----


def runs_table(frame: pd.DataFrame) -> TextTable:
    """A row a run: its number, label, status, best epoch or folds, macro F1 first, the other figures, the
    settings that differ."""
    figures = [column(split, PAIRED_METRIC) for split in EVAL_SPLITS]
    order = ["run", "status", "best_epoch", "folds", *figures, *SPREAD_COLUMNS,
             *(name for name in METRIC_COLUMNS if name not in figures)]
    shown = [name for name in order if name in frame.columns] + [name for name in frame.columns if name not in order]
    numeric = [column_title(name) for name in shown if name in (*METRIC_COLUMNS, *SPREAD_COLUMNS, *TRUST_COLUMNS)]
    rows = [[run_number(index), *row] for index, row in enumerate(frame[shown].itertuples(index=False))]
    return TextTable(f"{len(frame)} runs, best val macro F1 first", ["#", *map(column_title, shown)], rows, numeric,
                     keys=2)


def comparison_tables(frame: pd.DataFrame, runs: Sequence[Run], pairs: Sequence[PairedComparison]) -> list[TextTable]:
    """Every table of a comparison, built once and fitted to WIDTH columns: the runs (figures and the settings
    that differ), the breakdowns by donor and cell type, each paired comparison."""
    tables = [runs_table(frame), *(breakdown_table(runs, name, per_group) for name, per_group in BREAKDOWNS.items()),
              *(paired_table(pair) for pair in pairs)]
    return [part for table in tables if table is not None for part in table.fitted(WIDTH)]


@dataclass(frozen=True)
class Comparison:
    """The runs, best val macro F1 first; their table (one row a run); each run paired with the best; its
    tables as written and printed; the folder it was written to."""

    runs: list[Run]
    frame: pd.DataFrame
    pairs: list[PairedComparison]
    tables: list[TextTable]
    out: Path


def print_comparison(comparison: Comparison, console: Console | None = None) -> None:
    console = console or Console()
    for table in comparison.tables:
        table.print(console)


def plot_epochs(runs: Sequence[Run], labels: Sequence[str], path: Path) -> bool:
    """Val macro F1 per epoch, one line a run; a single-split run without epochs (the baseline) as a dashed
    level. A CV run has no curve of its own (its folds have theirs): it is left out. False when nothing
    was drawn (no plot written)."""
    figure = Figure(figsize=(7, 4))
    axis = figure.subplots()
    last_epoch, drawn = 0, False
    key = logged(VAL, PAIRED_METRIC)
    for label, run in zip(labels, runs):
        donors = ", ".join(run.donors(VAL))
        name = f"{label} (val {donors})" if donors else label
        scored = [epoch for epoch in run.epochs if key in epoch]  # a pretraining run's epochs have no macro F1
        if scored:
            epochs = [epoch["epoch"] for epoch in scored]
            last_epoch, drawn = max(last_epoch, *epochs), True
            axis.plot(epochs, [epoch[key] for epoch in scored], marker="o", label=name)
        elif not run.epochs and run.finished and not run.is_cv:
            axis.axhline(run.headline(VAL, PAIRED_METRIC), linestyle="--", color="grey", label=f"{label} (no epochs)")
    if not drawn:
        return False
    axis.set_xlabel("epoch")
    axis.set_ylabel("val macro F1")
    axis.set_xlim(-0.5, last_epoch + 0.5)
    axis.set_ylim(0, 1)
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_title("validation macro F1 per epoch")
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(figure, path)
    return True


def plot_paired_donors(runs: Sequence[Run], labels: Sequence[str], path: Path) -> bool:
    """Test macro F1 per donor, a column a run with per-donor figures (a CV run: its folds) and a line a donor
    between the runs: how each donor moves from one run to the next. False below two such runs."""
    scored = [(label, per_donor(run)) for label, run in zip(labels, runs)]
    scored = [(label, values) for label, values in scored if len(values) >= 2]
    if len(scored) < 2:
        return False
    figure = Figure(figsize=(2.5 + 1.6 * len(scored), 4))
    axis = figure.subplots()
    donors = sorted({donor for _, values in scored for donor in values})
    for donor in donors:
        points = [(x, values[donor]) for x, (_, values) in enumerate(scored) if donor in values]
        axis.plot(*zip(*points), marker="o", label=donor)
    means = [np.mean(list(values.values())) for _, values in scored]
    axis.plot(range(len(scored)), means, color="black", linewidth=2.5, linestyle="--", label="mean")
    axis.set_xticks(range(len(scored)), [label for label, _ in scored], rotation=20, ha="right")
    axis.set_xlim(-0.3, len(scored) - 0.7)
    axis.set_ylim(0, 1)
    axis.set_ylabel("test macro F1")
    axis.set_title("test macro F1 per donor (a line a donor)")
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(figure, path)
    return True


def plot_recall(runs: Sequence[Run], labels: Sequence[str], path: Path) -> bool:
    """Per-class recall on the val and test donors, grouped bars (one group a class, one bar a run), and chance."""
    finished = [(label, run) for label, run in zip(labels, runs) if run.finished]
    classes = list(dict.fromkeys(name for _, run in finished for name in run.class_names))
    figure = Figure(figsize=(len(EVAL_SPLITS) * (1 + 1.5 * max(len(classes), 1)), 4))
    axes = figure.subplots(1, len(EVAL_SPLITS), sharey=True)
    width = 0.8 / max(len(finished), 1)
    for axis, split in zip(axes, EVAL_SPLITS):
        for number, (label, run) in enumerate(finished):
            recalls = [run.headline(split, per_class("recall", name)) for name in classes]
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
    return True


def default_out(paths: Sequence[str | os.PathLike[str]], runs: Sequence[Run]) -> Path:
    """A new folder, beside the runs, named after what is compared (``comparison_<a>_vs_<b>``; a long name cut
    and ended by a hash), numbered ``-2``, ``-3`` ... where an earlier comparison holds the name."""
    name = OUT_PREFIX + "_vs_".join(Path(path).resolve().name for path in paths)
    if len(name.encode()) > MAX_OUT_NAME:
        name = name.encode()[: MAX_OUT_NAME - 9].decode(errors="ignore") + "~" + \
            hashlib.sha1(name.encode()).hexdigest()[:8]
    base = common_base([run.path for run in runs])
    out, number = base / name, 1
    while out.exists():
        number += 1
        out = base / f"{name}-{number}"
    return out


def compare_runs(paths: Iterable[str | os.PathLike[str]], out_dir: str | os.PathLike[str] | None = None
                 ) -> Comparison:
    """Compare the runs in and under ``paths`` (best val macro F1 first); write comparison.md and the plots
    to ``out_dir``, by default a new folder beside the runs named after ``paths`` (see :func:`default_out`)."""
    paths = list(paths)
    runs = ranked(read_run(path) for path in find_runs(paths))
    labels = run_labels(runs)
    frame = comparison_frame(runs, labels)
    pairs = paired_comparisons(runs, labels)
    tables = comparison_tables(frame, runs, pairs)
    out = Path(out_dir) if out_dir is not None else default_out(paths, runs)
    with output_folder(out, "compare", (TABLE_FILE, EPOCH_PLOT, RECALL_PLOT, DONOR_PLOT)) as written:
        (written / TABLE_FILE).write_text("\n".join(["# Run comparison\n", *(table.markdown() for table in tables)]))
        plots = [name for name, plot in ((EPOCH_PLOT, plot_epochs), (RECALL_PLOT, plot_recall),
                                         (DONOR_PLOT, plot_paired_donors)) if plot(runs, labels, written / name)]
    log.info("comparison written to %s (%s)", out, ", ".join([TABLE_FILE, *plots]))
    return Comparison(runs, frame, pairs, tables, out)
