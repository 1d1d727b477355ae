from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.tiny import CLASSES
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from geneformer_colon.model.metrics import ClassificationMetrics


def test_metrics_equal_scikit_learn_over_several_batches():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, size=500)
    logits = rng.normal(size=(500, 3)) + np.eye(3)[truth] * 0.8
    probabilities = torch.tensor(logits).softmax(-1).float()
    metrics = ClassificationMetrics(CLASSES)
    for start in range(0, 500, 64):
        batch = slice(start, start + 64)
        metrics.update(probabilities[batch], torch.tensor(truth[batch]), torch.tensor(1.0))
    values = metrics.compute()
    predicted = probabilities.numpy().argmax(1)
    assert values["accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-6)
    assert values["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"), abs=1e-6)
    assert values["macro_auroc"] == pytest.approx(
        roc_auc_score(truth, probabilities.numpy(), multi_class="ovr", average="macro"), abs=1e-5)
    for name, reference in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
        per_class = reference(truth, predicted, average=None)
        for index, class_name in enumerate(CLASSES):
            assert values[f"{name}/{class_name}"] == pytest.approx(per_class[index], abs=1e-6)
    assert metrics.confusion_matrix() == confusion_matrix(truth, predicted).tolist()
    assert values["loss"] == pytest.approx(1.0)
    metrics.reset()
    metrics.update(probabilities[:10], torch.tensor(truth[:10]), torch.tensor(2.0))
    assert metrics.compute()["loss"] == pytest.approx(2.0)
