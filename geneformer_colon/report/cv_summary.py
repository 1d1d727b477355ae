"""A cross-validated run's summary: its folds side by side and their aggregate, read from the folds.

``cv.json`` and ``cv.md`` in the parent run directory: a row a fold (test donor, validation
donor, cells, best epoch, val and test accuracy, macro F1, ROC AUC, per-class recall) and, for
each figure, the mean, standard deviation, min, max and a 95% confidence interval (Student's t)
across folds; ``plots/cv_per_donor.png``: test macro F1 per donor. With ``cv.seeds`` a fold's
figures are its means over the seeds (its ``seed_sd``: their standard deviation; ``seeds``: each
seed's own), and the figures across folds are taken over those per-donor means. The summary is
rebuilt from whatever folds have finished, so folds run by several jobs are gathered by the last to
end; a fold counts once all its seeds have finished.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from geneformer_colon.common.errors import InputError
from geneformer_colon.common.figures import plot_per_donor
from geneformer_colon.common.io import atomic_path, file_lock, read_json, rounded, write_json
from geneformer_colon.common.names import (
    CALIBRATED_METRICS,
    EVAL_SPLITS,
    FINISHED,
    GROUPINGS,
    METRICS,
    TEST,
    TRAIN,
    TRUST_METRICS,
    VAL,
    column,
    lower_is_better,
    per_class,
    split_figure,
)
from geneformer_colon.common.text_tables import markdown_table
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.reading import read_config, read_run
from geneformer_colon.runs.record import DIGITS

CONFIDENCE = 0.95
PARTIAL = "partial"


def spread(values: Sequence[float], bounds: tuple[float, float] = (0.0, 1.0)) -> dict[str, Any]:
    """Mean, sample standard deviation, min, max and the 95% t-interval of the mean (None below two values).

    The interval is clipped to ``bounds``, the range of the figure (every figure aggregated here is a
    proportion: accuracy, F1, ROC AUC, recall).
    """
    values = np.asarray([value for value in values if value is not None], dtype=float)
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None, "ci95": None}
    mean = float(values.mean())
    sd = float(values.std(ddof=1)) if n > 1 else None
    half = float(stats.t.ppf((1 + CONFIDENCE) / 2, n - 1) * sd / math.sqrt(n)) if n > 1 else None
    return {"n": n, "mean": mean, "sd": sd, "min": float(values.min()), "max": float(values.max()),
            "ci95": [max(mean - half, bounds[0]), min(mean + half, bounds[1])] if half is not None else None}


def fold_row(layout: RunLayout, class_names: Sequence[str]) -> dict[str, Any] | None:
    """A finished fold's figures, or None while it is not finished."""
    run = read_run(layout.root)
    if run.status != FINISHED:
        return None
    keys = fold_figures(class_names)
    return {
        "test_donor": ", ".join(run.donors(TEST)),
        "val_donor": ", ".join(run.donors(VAL)),
        "cells": run.metrics.get("cells", {}),
        "best_epoch": run.metrics.get("best_epoch"),
        "run_dir": layout.root.name,
        **{split: {key: split_figure(run.metrics[split], key) for key in keys} for split in EVAL_SPLITS},
        "chance_macro_f1": chance_macro_f1(run.metrics[TEST]["confusion_matrix"]),
        column(TEST, "macro_f1", GROUPINGS["cell_type"]): {
            cell_type: values["macro_f1"]
            for cell_type, values in run.metrics[TEST].get(GROUPINGS["cell_type"], {}).items()},
    }


def _mean(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return float(np.mean(present)) if present else None


def seed_sd(fold: Mapping[str, Any], split: str = TEST, metric: str = "macro_f1") -> float | None:
    """A fold's standard deviation of ``split``'s ``metric`` over its seeds (``cv.seeds``); None for one seed."""
    return fold.get("seed_sd", {}).get(split, {}).get(metric)


def seeded_row(parent: RunLayout, donor: str, seeds: Sequence[int], class_names: Sequence[str]
               ) -> dict[str, Any] | None:
    """A fold run once a seed: its figures' means over the seeds, their standard deviation (``seed_sd``) and
    each seed's own figures (``seeds``); None until every seed has finished."""
    runs = [fold_row(parent.fold(donor, seed), class_names) for seed in seeds]
    if any(run is None for run in runs):
        return None
    keys = list(runs[0][TEST])
    cell_types = sorted({name for run in runs for name in run["test_macro_f1_by_cell_type"]})
    return {
        **{key: runs[0][key] for key in ("test_donor", "val_donor", "cells")},
        "best_epoch": [run["best_epoch"] for run in runs],
        "run_dir": donor,
        **{split: {key: _mean([run[split][key] for run in runs]) for key in keys} for split in EVAL_SPLITS},
        "seed_sd": {split: {key: spread([run[split][key] for run in runs])["sd"] for key in keys}
                    for split in EVAL_SPLITS},
        "chance_macro_f1": _mean([run["chance_macro_f1"] for run in runs]),
        "test_macro_f1_by_cell_type": {name: _mean([run["test_macro_f1_by_cell_type"].get(name) for run in runs])
                                       for name in cell_types},
        "seeds": [{"seed": seed, "run_dir": f"{donor}/seed{seed}", "best_epoch": run["best_epoch"],
                   **{split: run[split] for split in EVAL_SPLITS}} for seed, run in zip(seeds, runs)],
    }


def chance_macro_f1(confusion: Sequence[Sequence[int]]) -> float:
    """Expected macro F1 of guessing classes uniformly at random, given the true class mix."""
    counts = np.asarray(confusion).sum(axis=1).astype(float)
    shares, guess = counts / max(counts.sum(), 1), 1 / len(counts)
    return float(np.mean(np.where(shares > 0, 2 * shares * guess / np.maximum(shares + guess, 1e-12), 0)))


def fold_figures(class_names: Sequence[str]) -> list[str]:
    """What cv.json keeps of each fold's splits: the headline metrics, each class's recall, and the calibration
    and abstention figures, raw and after the run's calibration."""
    return [*METRICS, *(per_class("recall", name) for name in class_names), *TRUST_METRICS, *CALIBRATED_METRICS]


def worst_fold(folds: Sequence[Mapping[str, Any]], split: str, key: str) -> dict[str, Any] | None:
    """The fold (test donor) with the worst figure: the highest of a calibration or abstention figure (lower is
    better), the lowest of any other."""
    present = [fold for fold in folds if fold[split].get(key) is not None]
    if not present:
        return None
    pick = max if lower_is_better(key) else min
    fold = pick(present, key=lambda fold: fold[split][key])
    return {"donor": fold["test_donor"], "value": fold[split][key]}


def aggregate(folds: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
    """Each figure's spread over the folds (:func:`spread`; NLL is not bounded by 1) and its worst fold."""
    keys = fold_figures(class_names)
    return {split: {key: {**spread([fold[split].get(key) for fold in folds],
                                   (0.0, math.inf) if key.endswith("nll") else (0.0, 1.0)),
                          "worst": worst_fold(folds, split, key)} for key in keys} for split in EVAL_SPLITS}


def cv_summary(parent: RunLayout, run_name: str, kind: str, donors: Sequence[str], class_names: Sequence[str],
               val_rule: str, seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """The content of cv.json from the finished folds under ``parent`` (in ``donors`` order); ``seeds``: each
    fold was run once a seed (``folds/<donor>/seed<k>/``)."""
    rows = [row for donor in donors if (row := seeded_row(parent, donor, seeds, class_names) if seeds
                                        else fold_row(parent.fold(donor), class_names)) is not None]
    finished = {row["run_dir"] for row in rows}
    return {
        "run_name": run_name,
        "kind": kind,
        "status": FINISHED if len(finished) == len(donors) else PARTIAL,
        "strategy": "lodo",
        "donors": list(donors),
        "seeds": list(seeds) if seeds else None,
        "val_rule": val_rule,
        "class_names": list(class_names),
        "folds": rows,
        "missing": [donor for donor in donors if donor not in finished],
        "aggregate": aggregate(rows, class_names),
    }


def cv_markdown(cv: Mapping[str, Any]) -> str:
    classes = cv["class_names"]
    seeds = cv.get("seeds")
    headers = ["test donor", "val donor", "cells train/val/test", "best epoch",
               *(f"{split} {title}" for split in EVAL_SPLITS for title in METRICS.values()),
               *(f"test recall {name}" for name in classes), *(["test macro F1 seed sd"] if seeds else [])]
    rows = [[fold["test_donor"], fold["val_donor"],
             "/".join(str(fold["cells"].get(split, "-")) for split in (TRAIN, VAL, TEST)),
             ", ".join(map(str, fold["best_epoch"])) if seeds else fold["best_epoch"],
             *(fold[split][metric] for split in EVAL_SPLITS for metric in METRICS),
             *(fold[TEST][per_class("recall", name)] for name in classes),
             *([fold["seed_sd"][TEST]["macro_f1"]] if seeds else [])] for fold in cv["folds"]]
    seeded = (f"Each fold ran once a seed ({', '.join(map(str, seeds))}): its figures are the means over the seeds, "
              "and the figures across folds are taken over those per-donor means.\n\n") if seeds else ""
    missing = f"\nNot finished: {', '.join(cv['missing'])}.\n" if cv["missing"] else ""
    return (f"# {cv['run_name']}: leave one donor out ({len(cv['folds'])} of {len(cv['donors'])} folds)\n\n"
            f"Validation donor of each fold: {cv['val_rule']}.\n\n" + seeded
            + markdown_table(headers, rows) + "\n## Across folds\n\n" + across_folds_markdown(cv) + missing)


def across_folds_markdown(cv: Mapping[str, Any]) -> str:
    """Each figure's mean, sd, min, max and 95% interval over the folds (what a CV run prints at its end); a figure
    no fold has (the calibrated ones of a run without calibration) is left out."""
    rows = []
    for split in EVAL_SPLITS:
        for key, values in cv["aggregate"][split].items():
            if not values["n"]:
                continue
            # recall/<class>: the class name as it is
            title = METRICS.get(key) or TRUST_METRICS.get(key) or CALIBRATED_METRICS.get(key) or \
                " ".join(key.partition("/")[::2])
            interval = "-" if values["ci95"] is None else f"{values['ci95'][0]:.3f} to {values['ci95'][1]:.3f}"
            worst = values.get("worst")
            rows.append([f"{split} {title}", values["n"], values["mean"], values["sd"], values["min"], values["max"],
                         interval, "-" if not worst else f"{worst['donor']} ({worst['value']:.3f})"])
    return markdown_table(["figure", "folds", "mean", "sd", "min", "max", "95% CI of the mean", "worst donor"], rows)


def write_cv_summary(parent: RunLayout, run_name: str, kind: str, donors: Sequence[str], class_names: Sequence[str],
                     val_rule: str, seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """Rebuild cv.json, cv.md and the per-donor plot from the finished folds (one writer at a time)."""
    with file_lock(parent.root / ".cv.lock"):
        cv = rounded(cv_summary(parent, run_name, kind, donors, class_names, val_rule, seeds), DIGITS)
        write_json(parent.cv_json, cv)
        with atomic_path(parent.cv_markdown) as tmp:
            tmp.write_text(cv_markdown(cv))
        if cv["folds"]:
            folds = cv["folds"]
            plot_per_donor([fold["test_donor"] for fold in folds], [fold[TEST]["macro_f1"] for fold in folds],
                           float(np.mean([fold["chance_macro_f1"] for fold in folds])), parent.cv_plot,
                           f"{run_name}: test macro F1 per left-out donor")
    return cv


def gather(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Rewrite a CV run's summary from the folds now under it (folds run elsewhere and copied in, say)."""
    parent = RunLayout(Path(run_dir))
    if not parent.folds.is_dir():
        raise InputError(f"{parent.root}: no folds/ here; give the directory of a cv=lodo run")
    config = read_config(parent.config)
    earlier = read_json(parent.cv_json)
    folds = sorted(path.name for path in parent.folds.iterdir() if path.is_dir())
    donors = earlier.get("donors") or config.get("cv", {}).get("donors") or folds
    kind = earlier.get("kind") or ("baseline" if "baseline" in config else "train")
    rule = earlier.get("val_rule") or "as in each fold's metrics.json"
    seeds = config.get("cv", {}).get("seeds") or []
    return write_cv_summary(parent, config.get("run_name", parent.root.name), kind, donors,
                            config.get("data", {}).get("labels") or [], rule, seeds if len(seeds) > 1 else None)
