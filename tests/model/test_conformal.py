"""Conformal sets (model/conformal.py, crepes): coverage on exchangeable cells, set sizes against model quality."""

from __future__ import annotations

import numpy as np
import pytest

from geneformer_colon.common.errors import InputError
from geneformer_colon.model.conformal import ConformalSets, set_figures, set_labels


def cells(signal: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A model's probabilities and true classes: the true class's logit raised by ``signal`` (a better model)."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), targets] += signal
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True), targets


def test_sets_cover_exchangeable_cells_and_shrink_as_the_model_improves():
    """Calibration and test cells split at random from one pool: at alpha 0.1 every seed's coverage is at least
    0.9 minus a finite-sample margin (3 binomial sd of 600 test cells), and their mean at least 0.9 - 0.01; a
    model with a stronger signal gets smaller sets."""
    coverages, sizes = [], {}
    for seed in range(5):
        for signal in (1.0, 3.0):
            probabilities, targets = cells(signal, 1200, seed)
            order = np.random.default_rng(seed + 100).permutation(1200)
            calibration, test = order[:600], order[600:]
            sets = ConformalSets(probabilities[calibration], targets[calibration]).sets(probabilities[test], 0.1)
            figures = set_figures(sets, targets[test], 0.1)
            sizes.setdefault(signal, []).append(figures["mean_set_size"])
            if signal == 1.0:
                coverages.append(figures["coverage"])
    margin = 3 * np.sqrt(0.1 * 0.9 / 600)
    assert min(coverages) >= 0.9 - margin and np.mean(coverages) >= 0.9 - 0.01
    assert np.mean(sizes[3.0]) < np.mean(sizes[1.0]) - 0.3
    assert set_labels(np.array([[True, False, True], [False, False, False]]), ["N", "B", "T"]) == ["N|T", ""]
    for alpha in (0.0, 1.0, -0.2):
        with pytest.raises(InputError, match="between 0 and 1"):
            ConformalSets(probabilities, targets).sets(probabilities, alpha)


def test_the_sets_are_crepes_own_non_smoothed_mondrian_sets():
    """Scores with ties (probabilities rounded to 0.1) and a class without calibration cells: every set equals
    crepes' predict_set with bins=k, smoothing=False."""
    from crepes.extras import hinge

    rng = np.random.default_rng(3)
    probabilities = np.round(rng.dirichlet(np.ones(4), 600), 1)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    targets = rng.choice(3, 300)  # class 3 never among the calibration cells
    conformal = ConformalSets(probabilities[:300], targets)
    for alpha in (0.05, 0.1, 0.3):
        ours = conformal.sets(probabilities[300:], alpha)
        scores = hinge(probabilities[300:])
        for k in range(4):
            theirs = conformal.classifier.predict_set(scores, bins=np.full(300, k), confidence=1 - alpha,
                                                      smoothing=False)[:, k].astype(bool)
            np.testing.assert_array_equal(ours[:, k], theirs)
        assert ours[:, 3].all()
