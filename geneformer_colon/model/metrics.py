"""Classification metrics: of a split while training (torchmetrics, synced across DDP ranks), and of
each donor or cell type of a split afterwards (scikit-learn, on the split's prediction table)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

# prediction-table column -> the metrics.json key of the breakdown by it
GROUPINGS = {"donor": "by_donor", "cell_type": "by_cell_type"}


class ClassificationMetrics(nn.Module):
    """Accuracy, macro F1, macro one-vs-rest ROC AUC, per-class precision/recall/F1, confusion, loss.

    ``compute()`` returns flat names (``macro_f1``, ``recall/Tumor``, ``loss`` ...) that the
    module logs under ``val/`` or ``test/``.
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        super().__init__()
        self.class_names = list(class_names)
        n = len(self.class_names)
        self.accuracy = MulticlassAccuracy(n, average="micro")
        self.macro_f1 = MulticlassF1Score(n, average="macro")
        self.macro_auroc = MulticlassAUROC(n, average="macro")
        self.precision = MulticlassPrecision(n, average=None)
        self.recall = MulticlassRecall(n, average=None)
        self.f1 = MulticlassF1Score(n, average=None)
        self.confusion = MulticlassConfusionMatrix(n)
        self.loss = MeanMetric()

    def update(self, probabilities: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor) -> None:
        for metric in (self.accuracy, self.macro_f1, self.macro_auroc, self.precision, self.recall, self.f1):
            metric.update(probabilities, targets)
        self.confusion.update(probabilities, targets)
        self.loss.update(loss.detach(), weight=len(targets))

    def compute(self) -> dict[str, float]:
        values = {
            "accuracy": self.accuracy.compute().item(),
            "macro_f1": self.macro_f1.compute().item(),
            "macro_auroc": self.macro_auroc.compute().item(),
            "loss": self.loss.compute().item(),
        }
        for name, metric in (("precision", self.precision), ("recall", self.recall), ("f1", self.f1)):
            for class_name, value in zip(self.class_names, metric.compute().tolist()):
                values[f"{name}/{class_name}"] = value
        return values

    def confusion_matrix(self) -> list[list[int]]:
        """Rows: true class, columns: predicted class, in ``class_names`` order."""
        return self.confusion.compute().long().tolist()

    def reset(self) -> None:
        for metric in self.children():
            metric.reset()


def group_metrics(table: pd.DataFrame, class_names: Sequence[str], probability_columns: Sequence[str]
                  ) -> dict[str, Any]:
    """Cells, accuracy, macro F1, per-class recall and (when every class is present) ROC AUC of the
    rows of a prediction table (columns ``true``, ``predicted`` and one probability a class).

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
        values["macro_auroc"] = float(roc_auc_score(truth, table[list(probability_columns)].to_numpy(),
                                                    multi_class="ovr", average="macro", labels=range(len(class_names))))
    for name, recall in zip(class_names, recalls):
        values[f"recall/{name}"] = None if np.isnan(recall) else float(recall)
    return values


def breakdowns(table: pd.DataFrame, class_names: Sequence[str], probability_columns: Sequence[str]
               ) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"by_donor": {donor: metrics}, "by_cell_type": {...}}`` for the groupings with more than one
    group among the rows (none for a split of one donor and one cell type)."""
    result = {}
    for column, key in GROUPINGS.items():
        groups = sorted(table[column].astype(str).unique())
        if len(groups) > 1:
            result[key] = {group: group_metrics(table[table[column].astype(str) == group], class_names,
                                                probability_columns) for group in groups}
    return result
