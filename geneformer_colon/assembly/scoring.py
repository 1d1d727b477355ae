"""A split scored: its prediction table, its ``metrics.json`` entry (with each donor's and cell type's
figures) and its files in a run directory. Training, eval, the baseline and predict all score a
split through :func:`score_split`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

from geneformer_colon.assembly.trust import CellTrust, RunTrust, cell_trust, trust_figures
from geneformer_colon.common.figures import plot_class_curves, plot_confusion
from geneformer_colon.common.names import GROUPINGS, VAL, per_class
from geneformer_colon.common.trust_figures import plot_coverage, plot_reliability
from geneformer_colon.model.calibration import BINS
from geneformer_colon.model.conformal import set_labels
from geneformer_colon.model.metrics import classification_metrics
from geneformer_colon.model.uncertainty import DEFAULT_SCORE, SCORES, curve_points
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.record import write_predictions


def probability_column(class_name: str) -> str:
    return f"prob_{class_name}"


def prediction_table(
    cells: pd.DataFrame, targets: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """One row a cell: id, donor, cell type, true and predicted class, one probability a class."""
    table = pd.DataFrame(
        {
            "cell_id": cells["cell_id"].to_numpy(),
            "donor": cells["donor"].to_numpy(),
            "cell_type": cells["cell_type"].to_numpy(),
            "true": np.asarray(class_names)[targets],
            "predicted": np.asarray(class_names)[probabilities.argmax(axis=1)],
        }
    )
    for column, name in enumerate(class_names):
        table[probability_column(name)] = probabilities[:, column]
    return table


def group_metrics(table: pd.DataFrame, class_names: Sequence[str]) -> dict[str, Any]:
    """Cells, accuracy, macro F1, per-class recall and (when every class is present) ROC AUC of the
    rows of a prediction table.

    Macro F1 averages over the classes that occur among the rows' true or predicted labels
    (scikit-learn's default, and torchmetrics' for a class with no true and no predicted cell);
    a class with no true cell has no recall (None).
    """
    index = {name: i for i, name in enumerate(class_names)}
    truth = table["true"].map(index).to_numpy()
    predicted = table["predicted"].map(index).to_numpy()
    recalls = recall_score(truth, predicted, labels=range(len(class_names)), average=None, zero_division=np.nan)
    values: dict[str, Any] = {
        "cells": len(table),
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, average="macro")),
        "macro_auroc": None,
    }
    if len(np.unique(truth)) == len(class_names):
        probabilities = table[[probability_column(name) for name in class_names]].to_numpy()
        values["macro_auroc"] = float(roc_auc_score(truth, probabilities, multi_class="ovr", average="macro",
                                                    labels=range(len(class_names))))
    for name, recall in zip(class_names, recalls):
        values[per_class("recall", name)] = None if np.isnan(recall) else float(recall)
    return values


def breakdowns(table: pd.DataFrame, class_names: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"by_donor": {donor: metrics}, "by_cell_type": {...}}`` for the groupings with more than one
    group among the rows (none for a split of one donor and one cell type)."""
    result = {}
    for column, key in GROUPINGS.items():
        groups = sorted(table[column].astype(str).unique())
        if len(groups) > 1:
            result[key] = {group: group_metrics(table[table[column].astype(str) == group], class_names)
                           for group in groups}
    return result


def split_entry(table: pd.DataFrame, metrics: Mapping[str, Any], confusion: Sequence[Sequence[int]],
                class_names: Sequence[str]) -> dict[str, Any]:
    """A split's metrics.json entry: its metrics, cells, confusion matrix and, where the split has
    several donors or cell types, the breakdown by each."""
    return {**metrics, "cells": len(table), "confusion_matrix": [list(row) for row in confusion],
            **breakdowns(table, class_names)}


def uncertainty_column(score: str) -> str:
    return f"uncertainty_{score}"


def trust_columns(table: pd.DataFrame, split: str, cells: CellTrust, class_names: Sequence[str]) -> pd.DataFrame:
    """The prediction table with each cell's uncertainty scores (``uncertainty_<score>``, empty where the model
    gives none: a baseline has no logits or embeddings) and, but on the validation split, its conformal set
    (``conformal_set``: its classes joined by ``|``; empty without the run's validation fit). One schema for
    every kind of run."""
    for name in SCORES:
        table[uncertainty_column(name)] = cells.scores.get(name, np.nan)
    if split != VAL:
        table["conformal_set"] = set_labels(cells.sets, class_names) if cells.sets is not None else ""
    return table


def with_trust(entry: dict[str, Any], split: str, table: pd.DataFrame, targets: np.ndarray,
               probabilities: np.ndarray, cells: CellTrust, trust: RunTrust | None) -> dict[str, Any]:
    """A split's entry with its trust figures (:func:`trust_figures`; conformal sets but on the validation split),
    overall and each donor's."""
    conformal = split != VAL
    entry.update(trust_figures(targets, probabilities, cells, trust, conformal))
    donors = table["donor"].astype(str).to_numpy()
    for donor, figures in entry.get(GROUPINGS["donor"], {}).items():
        rows = donors == donor
        figures.update(trust_figures(targets[rows], probabilities[rows],
                                     CellTrust(cells.calibrated[rows], {k: v[rows] for k, v in cells.scores.items()},
                                               None if cells.sets is None else cells.sets[rows]), trust,
                                     conformal))
    return entry


def write_trust_plots(layout: RunLayout, split: str, table: pd.DataFrame, targets: np.ndarray,
                      probabilities: np.ndarray, cells: CellTrust, heading: str) -> None:
    """The split's reliability diagram (before and after calibration) and its coverage curves (a line a donor
    where it has several)."""
    curves = {"raw": (probabilities, targets)}
    if cells.calibrated is not probabilities:
        curves["calibrated"] = (cells.calibrated, targets)
    plot_reliability(curves, BINS, layout.trust_plot("reliability", split), heading)
    predicted, score = cells.calibrated.argmax(axis=1), cells.scores[DEFAULT_SCORE]
    groups = {"all": np.ones(len(table), dtype=bool)}
    donors = table["donor"].astype(str).to_numpy()
    if len(set(donors)) > 1:
        groups.update({donor: donors == donor for donor in sorted(set(donors))})
    plot_coverage({name: curve_points(targets[rows], predicted[rows], score[rows]) for name, rows in groups.items()},
                  layout.trust_plot("coverage", split), f"{heading} (by {DEFAULT_SCORE})")


def score_split(layout: RunLayout, split: str, cells: pd.DataFrame, targets: np.ndarray, probabilities: np.ndarray,
                class_names: Sequence[str], title: str,
                computed: tuple[Mapping[str, Any], Sequence[Sequence[int]]] | None = None,
                loss: float | None = None, write: bool = True, trust: RunTrust | None = None,
                logits: np.ndarray | None = None, embeddings: np.ndarray | None = None) -> dict[str, Any]:
    """Score a split and write it: its metrics.json entry; with ``write``, ``predictions/<split>.csv``, its
    confusion plot, its per-class ROC and precision-recall curves, its reliability diagram and its coverage
    curves (titled ``title``, the split and its donors) under ``layout``.

    ``computed``: the metrics and confusion matrix already computed (training's, synced across DDP
    ranks); else they are computed here from ``probabilities`` (with ``loss``, when given). These are the
    model's own (uncalibrated) figures; the calibration, uncertainty and abstention figures come from
    ``trust`` (the run's calibration, conformal sets on any split but the validation one it was fitted on),
    ``logits`` (the energy score) and ``embeddings`` (the kNN score).
    """
    table = prediction_table(cells, targets, probabilities, class_names)
    metrics, confusion = computed or classification_metrics(probabilities, targets, class_names, loss)
    trusted = cell_trust(probabilities, trust, logits, embeddings, conformal=split != VAL)
    table = trust_columns(table, split, trusted, class_names)
    if write:
        write_predictions(layout, split, table)
        donors = ", ".join(sorted(table["donor"].astype(str).unique()))
        heading = f"{title}, {split}: {donors}"
        plot_confusion(confusion, class_names, layout.confusion_plot(split), heading)
        plot_class_curves(table["true"].to_numpy(), probabilities, class_names, layout.curve_plot("roc", split),
                          layout.curve_plot("pr", split), heading)
        write_trust_plots(layout, split, table, targets, probabilities, trusted, heading)
    return with_trust(split_entry(table, metrics, confusion, class_names), split, table, targets, probabilities,
                      trusted, trust)
