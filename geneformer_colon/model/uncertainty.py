"""How unsure the model is of each cell, and what abstaining on the least sure cells buys.

Four scores a cell, each higher for a less certain call:

- ``max_softmax``: 1 minus the highest class probability;
- ``entropy``: the entropy of the class probabilities (nats);
- ``energy``: minus the log-sum-exp of the head's logits (Liu et al. 2020); none without logits (a baseline);
- ``knn``: the mean Euclidean distance of the cell's embedding to its ``k`` nearest training cells (an
  out-of-distribution score: a cell unlike any the model trained on); none without the run's reference cells.

A risk-coverage curve orders the cells from the surest to the least sure: at coverage ``k / n`` the model
answers for the ``k`` surest cells and its risk is their error rate; the area under it (AURC) is the mean of
the ``n`` risks. Abstaining at a coverage keeps the cells whose score is at most the threshold that keeps that
fraction of the validation donors' cells.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.special import logsumexp
from sklearn.neighbors import NearestNeighbors

SCORES = ("max_softmax", "entropy", "energy", "knn")
DEFAULT_SCORE = "max_softmax"
# The coverages metrics.json reports accuracy and macro F1 at.
COVERAGES = (0.9, 0.8)


def uncertainty_scores(probabilities: np.ndarray, logits: np.ndarray | None = None,
                       distances: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each score a cell (see the module docstring) that the inputs allow, in :data:`SCORES` order."""
    p = np.asarray(probabilities, dtype=np.float64)
    scores = {"max_softmax": 1.0 - p.max(axis=1),
              "entropy": -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)}
    if logits is not None:
        scores["energy"] = -logsumexp(np.asarray(logits, dtype=np.float64), axis=1)
    if distances is not None:
        scores["knn"] = np.asarray(distances, dtype=np.float64)
    return scores


class EmbeddingIndex:
    """The training cells' embeddings (a reference sample) indexed once; :meth:`distances` of other cells."""

    def __init__(self, reference: np.ndarray, k: int = 10) -> None:
        self.reference = np.asarray(reference, dtype=np.float32)
        self.k = min(k, len(self.reference))
        self.neighbours = NearestNeighbors(n_neighbors=self.k).fit(self.reference)

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """The mean distance of each embedding to its ``k`` nearest reference cells (NaN rows stay NaN)."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        result = np.full(len(embeddings), np.nan)
        present = ~np.isnan(embeddings).any(axis=1)
        if present.any():
            result[present] = self.neighbours.kneighbors(embeddings[present])[0].mean(axis=1)
        return result


def risk_coverage(correct: np.ndarray, uncertainty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverages ``k / n`` and the error rates of the ``k`` surest cells, ``k`` = 1..n (ties: cell order)."""
    order = np.argsort(uncertainty, kind="stable")
    errors = np.cumsum(~np.asarray(correct, dtype=bool)[order])
    answered = np.arange(1, len(order) + 1)
    return answered / len(order), errors / answered


def aurc(correct: np.ndarray, uncertainty: np.ndarray) -> float:
    """The area under the risk-coverage curve: the mean error rate over the coverages ``1/n .. 1``."""
    return float(risk_coverage(correct, uncertainty)[1].mean())


def threshold_for(coverage: float, reference: np.ndarray) -> float:
    """The score at or below which ``coverage`` of the ``reference`` scores lie (the ceil(coverage * n)-th
    smallest; the product rounded to 9 decimals first, so 0.07 x 100 is 7, not 8): cells scored at most this are
    answered."""
    ordered = np.sort(np.asarray(reference, dtype=np.float64))
    return float(ordered[max(int(np.ceil(round(coverage * len(ordered), 9))) - 1, 0)])


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """scikit-learn's macro F1 (over the classes among the true or predicted ones), in numpy: the curves take it
    at many coverages."""
    labels = np.union1d(truth, predicted)
    hits = truth[:, None] == labels
    calls = predicted[:, None] == labels
    true_positive = (hits & calls).sum(axis=0)
    return float(np.mean(2 * true_positive / (hits.sum(axis=0) + calls.sum(axis=0))))


def at_coverage(truth: np.ndarray, predicted: np.ndarray, uncertainty: np.ndarray, coverage: float
                ) -> dict[str, Any]:
    """Accuracy and macro F1 of the surest ``coverage`` of the cells (``round(coverage * n)``, at least one)."""
    keep = np.argsort(uncertainty, kind="stable")[: max(int(round(coverage * len(truth))), 1)]
    return {"coverage": len(keep) / len(truth), "accuracy": float(np.mean(truth[keep] == predicted[keep])),
            "macro_f1": macro_f1(truth[keep], predicted[keep])}


def coverage_key(coverage: float) -> str:
    """metrics.json's key of the figures at a coverage: ``at_90``."""
    return f"at_{round(coverage * 100)}"


def abstention_figures(truth: np.ndarray, predicted: np.ndarray, uncertainty: np.ndarray) -> dict[str, Any]:
    """``aurc`` and, for each of :data:`COVERAGES`, ``at_<percent>``: accuracy and macro F1 there."""
    figures: dict[str, Any] = {"aurc": aurc(truth == predicted, uncertainty)}
    for coverage in COVERAGES:
        figures[coverage_key(coverage)] = at_coverage(truth, predicted, uncertainty, coverage)
    return figures


def curve_points(truth: np.ndarray, predicted: np.ndarray, uncertainty: np.ndarray, points: int = 50
                 ) -> Mapping[str, np.ndarray]:
    """Accuracy and macro F1 at ``points`` coverages from 1/points to 1 (a plot's curves)."""
    coverages = np.linspace(1 / points, 1, points)
    values = [at_coverage(truth, predicted, uncertainty, coverage) for coverage in coverages]
    return {"coverage": np.array([value["coverage"] for value in values]),
            "accuracy": np.array([value["accuracy"] for value in values]),
            "macro_f1": np.array([value["macro_f1"] for value in values])}
