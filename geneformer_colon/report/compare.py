"""Runs side by side: find run directories, tabulate their metrics and the config that differs, plot them.

A run directory is anything train.py or baseline.py wrote (``metrics.json``, ``config.yaml``,
or at least Hydra's ``.hydra/config.yaml`` for a job that died early). A sweep root is any
folder holding run directories at any depth. Nothing here needs W&B.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.table import Table

from geneformer_colon.errors import InputError
from geneformer_colon.io import atomic_path

log = logging.getLogger(__name__)

RUN_MARKERS = ("metrics.json", "config.yaml", ".hydra/config.yaml")
# Config keys that say where a run is or what it is called, not how it was made.
NOISE_KEYS = (
    "paths.*", "hydra.*", "run_name", "resume", "overwrite",
    "*run_dir", "*save_dir", "*cache_dir", "*data_dir", "*dirpath", "*default_root_dir",
    "data.source.gene_map", "logger.*.name", "logger.*.group", "logger.*.id", "logger.*.version",
)
SPLITS = ("val", "test")
METRICS = {"accuracy": "acc", "macro_f1": "macro F1", "macro_auroc": "ROC AUC"}
METRIC_COLUMNS = [f"{split}_{metric}" for split in SPLITS for metric in METRICS]
TABLE_FILE = "comparison.md"
EPOCH_PLOT = "val_macro_f1_per_epoch.png"
RECALL_PLOT = "recall_per_class.png"


@dataclass
class Run:
    """One run directory as read from disk; ``metrics`` is empty while there is no metrics.json."""

    path: Path
    metrics: dict[str, Any]
    config: dict[str, Any]

    @property
    def status(self) -> str:
        return str(self.metrics.get("status", "no metrics.json"))

    @property
    def finished(self) -> bool:
        return self.status == "finished" and all(split in self.metrics for split in SPLITS)

    @property
    def epochs(self) -> list[dict[str, float]]:
        return list(self.metrics.get("epochs", []))

    @property
    def class_names(self) -> list[str]:
        """From the per-class recalls of the final metrics, else of the epochs, else the config."""
        source = self.metrics.get("val") or (self.epochs[-1] if self.epochs else {})
        names = [key.rsplit("/", 1)[1] for key in source if "recall/" in key]
        return names or list(self.config.get("data", {}).get("labels", []))


def is_run_dir(path: Path) -> bool:
    return any((path / marker).is_file() for marker in RUN_MARKERS)


def find_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Run directories among ``paths`` and under them (a run's own sub-folders, e.g. eval/, are not runs)."""
    found: dict[Path, None] = {}
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise InputError(f"{path}: no such directory; give run directories or sweep roots")
        before = len(found)
        for folder, subfolders, _ in os.walk(path):
            folder_path = Path(folder)
            if is_run_dir(folder_path):
                found[folder_path.resolve()] = None
                subfolders.clear()
            else:
                subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        if len(found) == before:
            raise InputError(f"{path}: holds no run directory (none with {', '.join(RUN_MARKERS)} at any depth)")
    return list(found)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"focal_gamma": 1.5}}`` -> ``{"loss.focal_gamma": 1.5}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_noise(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in NOISE_KEYS)


def display(value: Any) -> str:
    """A config value as one short string (also what values are compared by)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(display(item) for item in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def read_run(path: str | os.PathLike[str]) -> Run:
    """metrics.json and the config of a run directory (config.yaml, else Hydra's unresolved copy)."""
    path = Path(path)
    metrics: dict[str, Any] = {}
    if (path / "metrics.json").is_file():
        try:
            metrics = json.loads((path / "metrics.json").read_text())
        except json.JSONDecodeError:
            metrics = {"status": "unreadable metrics.json"}
    config: dict[str, Any] = {}
    for name in ("config.yaml", ".hydra/config.yaml"):
        if (path / name).is_file():
            loaded = OmegaConf.load(path / name)
            try:
                config = OmegaConf.to_container(loaded, resolve=True)
            except OmegaConfBaseException:  # e.g. a resolver only a Hydra app has
                config = OmegaConf.to_container(loaded, resolve=False)
            break
    return Run(path=path, metrics=metrics, config=config)


def differing_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Flat config keys whose value is not the same in every config (absent counts as a value)."""
    flats = [flatten(config) for config in configs]
    keys = list(dict.fromkeys(key for flat in flats for key in flat))
    return [
        key for key in keys
        if not is_noise(key) and len({display(flat[key]) if key in flat else None for flat in flats}) > 1
    ]


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
    """Best val macro F1 first; runs without final metrics last, in the order given."""
    return sorted(runs, key=lambda run: -run.metrics["val"]["macro_f1"] if run.finished else np.inf)


def comparison_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """One row a run, in the order given: status, best epoch, final metrics, the config that differs."""
    keys = differing_keys([run.config for run in runs])
    rows = []
    for label, run in zip(run_labels(runs), runs):
        row: dict[str, Any] = {"run": label, "status": run.status,
                               "best_epoch": run.metrics.get("best_epoch") if run.finished else None}
        for split in SPLITS:
            for metric in METRICS:
                row[f"{split}_{metric}"] = run.metrics[split][metric] if run.finished else np.nan
        flat = flatten(run.config)
        row.update({key: display(flat[key]) if key in flat else "-" for key in keys})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["run", "status", "best_epoch", *METRIC_COLUMNS, *keys])
    frame["best_epoch"] = frame["best_epoch"].astype("Int64")
    return frame


def column_title(column: str) -> str:
    split, _, metric = column.partition("_")
    if split in SPLITS and metric in METRICS:
        return f"{split} {METRICS[metric]}"
    return "best epoch" if column == "best_epoch" else column


def cell_text(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (no tabulate dependency); ``|`` in cells is escaped."""
    def line(cells: Iterable[Any]) -> str:
        return "| " + " | ".join(cell_text(cell).replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(headers), *(line(row) for row in rows)]) + "\n"


def frame_markdown(frame: pd.DataFrame) -> str:
    return markdown_table([column_title(c) for c in frame.columns], frame.itertuples(index=False))


def print_comparison(frame: pd.DataFrame, console: Console | None = None) -> None:
    """The comparison as a rich table; piped output is not cut to 80 columns."""
    console = console or Console()
    if not console.is_terminal:
        console.width = 1000
    table = Table(title=f"{len(frame)} runs, best val macro F1 first")
    for column in frame.columns:
        numeric = column in METRIC_COLUMNS
        table.add_column(column_title(column), justify="right" if numeric else "left", no_wrap=numeric)
    for row in frame.itertuples(index=False):
        table.add_row(*(cell_text(value) for value in row))
    console.print(table)


def save_figure(figure: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_epochs(runs: Sequence[Run], labels: Sequence[str], path: Path) -> None:
    """Val macro F1 per epoch, one line a run; a run without epochs (the baseline) as a dashed level."""
    figure = Figure(figsize=(7, 4))
    axis = figure.subplots()
    for label, run in zip(labels, runs):
        if run.epochs:
            axis.plot([epoch["epoch"] for epoch in run.epochs], [epoch["val/macro_f1"] for epoch in run.epochs],
                      marker="o", label=label)
        elif run.finished:
            axis.axhline(run.metrics["val"]["macro_f1"], linestyle="--", color="grey", label=f"{label} (no epochs)")
    axis.set_xlabel("epoch")
    axis.set_ylabel("val macro F1")
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_title("validation macro F1 per epoch")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(figure, path)


def plot_recall(runs: Sequence[Run], labels: Sequence[str], path: Path) -> None:
    """Per-class recall on the val and test donors, grouped bars: one group a class, one bar a run."""
    finished = [(label, run) for label, run in zip(labels, runs) if run.finished]
    classes = list(dict.fromkeys(name for _, run in finished for name in run.class_names))
    figure = Figure(figsize=(len(SPLITS) * (1 + 1.5 * max(len(classes), 1)), 4))
    axes = figure.subplots(1, len(SPLITS), sharey=True)
    width = 0.8 / max(len(finished), 1)
    for axis, split in zip(axes, SPLITS):
        for number, (label, run) in enumerate(finished):
            recalls = [run.metrics[split].get(f"recall/{name}", np.nan) for name in classes]
            axis.bar(np.arange(len(classes)) + (number - (len(finished) - 1) / 2) * width, recalls, width, label=label)
        axis.set_xticks(range(len(classes)), classes)
        axis.set_ylim(0, 1)
        axis.set_title(f"recall per class, {split}")
    axes[0].set_ylabel("recall")
    if finished:
        axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(figure, path)


def compare_runs(
    paths: Iterable[str | os.PathLike[str]], out_dir: str | os.PathLike[str] | None = None
) -> pd.DataFrame:
    """Compare the runs in and under ``paths`` (best val macro F1 first); write comparison.md and
    the two plots to ``out_dir``, by default the deepest folder holding all the runs."""
    runs = ranked(read_run(path) for path in find_runs(paths))
    frame = comparison_frame(runs)
    out = Path(out_dir) if out_dir is not None else common_base([run.path for run in runs])
    with atomic_path(out / TABLE_FILE) as tmp:
        tmp.write_text(f"# Run comparison\n\n{frame_markdown(frame)}")
    plot_epochs(runs, list(frame["run"]), out / EPOCH_PLOT)
    plot_recall(runs, list(frame["run"]), out / RECALL_PLOT)
    log.info("comparison written to %s (%s, %s, %s)", out, TABLE_FILE, EPOCH_PLOT, RECALL_PLOT)
    return frame
