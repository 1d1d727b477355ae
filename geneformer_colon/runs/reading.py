"""Runs read back from disk: one run directory (:func:`read_run`), or every run under some folders
(:func:`find_runs`); a CV run is one run."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import read_json
from geneformer_colon.common.names import EVAL_SPLITS, FINISHED, RUNNING, VAL, logged, per_class, split_figure
from geneformer_colon.runs.config import renamed_targets
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.record import EPOCHS_FROM

RUN_MARKERS = ("metrics.json", "config.yaml", "cv.json", ".hydra/config.yaml")


@dataclass
class Run:
    """One run directory as read from disk; ``metrics`` is empty while there is no metrics.json."""

    path: Path
    metrics: dict[str, Any]
    config: dict[str, Any]
    cv: dict[str, Any]

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.path)

    @property
    def is_cv(self) -> bool:
        return bool(self.cv)

    @property
    def status(self) -> str:
        if self.is_cv:
            return str(self.cv.get("status", RUNNING))
        return str(self.metrics.get("status", "no metrics.json"))

    @property
    def finished(self) -> bool:
        if self.is_cv:
            return bool(self.cv.get("folds"))
        return self.status == FINISHED and all(split in self.metrics for split in EVAL_SPLITS)

    @property
    def epochs(self) -> list[dict[str, float]]:
        return list(self.metrics.get("epochs", []))

    @property
    def name(self) -> str:
        return str(self.metrics.get("run_name") or self.cv.get("run_name") or self.config.get("run_name")
                   or self.path.name)

    def headline(self, split: str, metric: str) -> float:
        """A final figure: the run's own, or for a CV run the mean over its folds (NaN if absent)."""
        if self.is_cv:
            return self._across_folds(split, metric, "mean")
        value = split_figure(self.metrics.get(split, {}), metric)
        return np.nan if value is None else float(value)

    def spread(self, split: str, metric: str) -> float:
        """For a CV run, the standard deviation over its folds (NaN below two folds); NaN otherwise."""
        return self._across_folds(split, metric, "sd")

    def _across_folds(self, split: str, metric: str, statistic: str) -> float:
        value = self.cv.get("aggregate", {}).get(split, {}).get(metric, {}).get(statistic)
        return np.nan if value is None else float(value)

    @property
    def class_names(self) -> list[str]:
        """From the per-class recalls of the final metrics, else of the epochs, else the config."""
        source = self.metrics.get(VAL) or (self.epochs[-1] if self.epochs else {})
        names = [key.removeprefix(prefix) for key in source for prefix in (per_class("recall", ""),
                                                                           logged(VAL, per_class("recall", "")))
                 if key.startswith(prefix)]  # a class name may hold "/" itself ("CD4+/CD25 T Reg")
        return names or list(self.cv.get("class_names", [])) or list(self.config.get("data", {}).get("labels") or [])

    def donors(self, split: str) -> list[str]:
        """The donors of a split: recorded by the run, else the config's (train: not recorded there)."""
        recorded = self.metrics.get("donors", {}).get(split)
        if recorded is not None:
            return list(recorded)
        return list(self.config.get("data", {}).get(f"{split}_donors") or [])


def read_config(path: Path) -> dict[str, Any]:
    """A YAML config as plain containers (resolved where its interpolations allow), {} if absent."""
    if not path.is_file():
        return {}
    try:
        loaded = OmegaConf.load(path)
    except (OmegaConfBaseException, OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable config ({error}); the run directory is damaged") from None
    try:
        return renamed_targets(OmegaConf.to_container(loaded, resolve=True))
    except OmegaConfBaseException:  # e.g. a resolver only a Hydra app has
        return renamed_targets(OmegaConf.to_container(loaded, resolve=False))


def read_run(path: str | os.PathLike[str]) -> Run:
    """metrics.json, cv.json and the config of a run directory (config.yaml, else Hydra's copy)."""
    layout = RunLayout(Path(path))
    metrics = current_record(read_json(layout.metrics))
    if layout.metrics.is_file() and not metrics:
        metrics = {"status": "unreadable metrics.json"}
    config = read_config(layout.config) or read_config(layout.root / ".hydra" / "config.yaml")
    return Run(path=layout.root, metrics=metrics, config=config, cv=read_json(layout.cv_json))


def current_record(metrics: dict[str, Any]) -> dict[str, Any]:
    """A metrics.json record as this version writes it: one written before epochs were counted from 1 (it has
    no ``epochs_from``) gets its epochs and best epoch shifted."""
    if not metrics or "epochs_from" in metrics:
        return metrics
    best = metrics.get("best_epoch")
    return {**metrics, "epochs_from": EPOCHS_FROM,
            "epochs": [{**epoch, "epoch": epoch["epoch"] + EPOCHS_FROM} for epoch in metrics.get("epochs", [])],
            "best_epoch": None if best is None else best + EPOCHS_FROM}


def is_run_dir(path: Path) -> bool:
    return any((path / marker).is_file() for marker in RUN_MARKERS)


def find_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Run directories among ``paths`` and under them.

    A run's own sub-folders (eval/, folds/) are not separate runs: a CV run is one run.
    """
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

