"""Conformal prediction sets (crepes): split conformal, class-conditional (Mondrian by the true class),
calibrated on the validation donors' cells.

The nonconformity of a cell for a class is the hinge score ``1 - p(class)``; a class enters a cell's set
when its (non-smoothed, so deterministic and conservative) p-value against the calibration cells of that
class is at least ``alpha``. Where the calibration and the new cells are exchangeable, each class's cells are
covered with probability at least ``1 - alpha``. A new donor is not exchangeable with the validation donors
(donor shift), so the coverage a held-out donor gets must be measured, not assumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from geneformer_colon.common.errors import InputError
from geneformer_colon.common.names import CLASS_SEPARATOR

DEFAULT_ALPHA = 0.1


def check_alpha(alpha: float, setting: str) -> None:
    if not 0 < alpha < 1:
        raise InputError(f"{setting}: {alpha} is no miscoverage rate; give a number between 0 and 1 (exclusive), "
                         "e.g. 0.1 for sets that hold the true class 90% of the time")


class ConformalSets:
    """A Mondrian conformal classifier fitted on calibration cells' probabilities and true classes (crepes'
    ``ConformalClassifier``, its hinge scores and its non-smoothed p-values)."""

    def __init__(self, probabilities: np.ndarray, targets: np.ndarray) -> None:
        from crepes import ConformalClassifier
        from crepes.extras import hinge

        self.n_classes = probabilities.shape[1]
        targets = np.asarray(targets, dtype=np.int64)
        self.scores = hinge(probabilities, np.arange(self.n_classes), targets)
        self.classes = targets
        self.classifier = ConformalClassifier().fit(self.scores, bins=targets)
        self.sorted_by_class = [np.sort(self.classifier.alphas[self.classifier.bins == k])
                                for k in range(self.n_classes)]

    def sets(self, probabilities: np.ndarray, alpha: float) -> np.ndarray:
        """A boolean matrix (cells x classes): whether each class is in each cell's set at level ``1 - alpha``.

        Class ``k`` enters when the p-value of its hinge score against class ``k``'s calibration scores,
        ``(#{calibration scores >= score} + 1) / (n_k + 1)``, is at least ``alpha``: crepes' ``predict_set`` with
        ``bins=k`` and ``smoothing=False`` (equal in the tests), by a sorted search instead of its loop over
        cells and classes (10 classes x 100,000 cells: 37 s there)."""
        from crepes.extras import hinge

        check_alpha(alpha, "alpha")
        scores = hinge(probabilities)
        chosen = np.zeros(probabilities.shape, dtype=bool)
        for k, calibration in enumerate(self.sorted_by_class):  # each class against its own calibration cells
            at_least = len(calibration) - np.searchsorted(calibration, scores[:, k], side="left")
            chosen[:, k] = (at_least + 1) / (len(calibration) + 1) >= alpha
        return chosen


def set_labels(sets: np.ndarray, class_names: Sequence[str]) -> list[str]:
    """Each cell's set as one string: its classes joined by ``|`` (empty for an empty set)."""
    return [CLASS_SEPARATOR.join(name for name, chosen in zip(class_names, row) if chosen) for row in sets]


def set_figures(sets: np.ndarray, targets: np.ndarray, alpha: float) -> dict[str, Any]:
    """The empirical coverage (true class in the set), the mean set size and the share of empty sets."""
    sizes = sets.sum(axis=1)
    return {"alpha": alpha, "coverage": float(sets[np.arange(len(targets)), targets].mean()),
            "mean_set_size": float(sizes.mean()), "empty": float((sizes == 0).mean())}
