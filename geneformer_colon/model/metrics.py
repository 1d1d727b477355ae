"""Classification metrics of a split (torchmetrics, synced across DDP ranks): while training, and of any
class probabilities in hand (the baseline, predict). Each donor's and cell type's figures are
:mod:`geneformer_colon.assembly.scoring`'s."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import f1_score
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

from geneformer_colon.common.names import per_class


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
                values[per_class(name, class_name)] = value
        return values

    def confusion_matrix(self) -> list[list[int]]:
        """Rows: true class, columns: predicted class, in ``class_names`` order."""
        return self.confusion.compute().long().tolist()

    def reset(self) -> None:
        for metric in self.children():
            metric.reset()


def classification_metrics(probabilities: np.ndarray, targets: np.ndarray, class_names: Sequence[str],
                           loss: float | None = None) -> tuple[dict[str, float], list[list[int]]]:
    """The training metrics (same keys, same code) and confusion matrix of class probabilities in hand;
    ``loss`` left out when not given."""
    metrics = ClassificationMetrics(class_names)
    metrics.update(torch.from_numpy(probabilities), torch.from_numpy(targets), torch.tensor(loss or 0.0))
    values = metrics.compute()
    if loss is None:
        del values["loss"]
    return values, metrics.confusion_matrix()


def worst_group_macro_f1(truth: np.ndarray, predicted: np.ndarray, groups: np.ndarray) -> float | None:
    """The lowest macro F1 among the groups (scikit-learn's, as the per-donor figures of ``metrics.json``),
    None below two groups."""
    names = np.unique(groups)
    if len(names) < 2:
        return None
    return float(min(f1_score(truth[groups == name], predicted[groups == name], average="macro") for name in names))
