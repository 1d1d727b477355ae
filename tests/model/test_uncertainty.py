"""Uncertainty scores, risk-coverage and abstention thresholds (model/uncertainty.py)."""

from __future__ import annotations

import numpy as np
import pytest

from geneformer_colon.model.uncertainty import (
    EmbeddingIndex,
    abstention_figures,
    aurc,
    macro_f1,
    risk_coverage,
    threshold_for,
    uncertainty_scores,
)


def test_a_planted_risk_coverage_curve_is_monotone_and_its_area_is_the_direct_one():
    """Easy cells (sure, all right) before hard ones (unsure, all wrong), shuffled: the risk never falls as
    coverage grows, is 0 until the hard cells come, and the AURC is the mean risk over k = 1..n written out."""
    rng = np.random.default_rng(0)
    easy, hard = 60, 40
    uncertainty = np.concatenate([rng.uniform(0, 0.3, easy), rng.uniform(0.5, 1, hard)])
    correct = np.concatenate([np.ones(easy, bool), np.zeros(hard, bool)])
    order = rng.permutation(easy + hard)
    uncertainty, correct = uncertainty[order], correct[order]
    coverage, risk = risk_coverage(correct, uncertainty)
    assert (np.diff(risk) >= 0).all() and (risk[:easy] == 0).all() and risk[-1] == pytest.approx(0.4)
    assert coverage[0] == pytest.approx(0.01) and coverage[-1] == 1
    ranked = correct[np.argsort(uncertainty)]
    direct = np.mean([np.mean(~ranked[:k]) for k in range(1, easy + hard + 1)])
    assert aurc(correct, uncertainty) == pytest.approx(direct, abs=1e-12)
    truth = np.zeros(easy + hard, int)
    figures = abstention_figures(truth, np.where(correct, 0, 1), uncertainty)
    assert figures["at_80"]["accuracy"] == pytest.approx(60 / 80) and figures["at_90"]["coverage"] == 0.9


def test_scores_thresholds_and_the_embedding_index():
    probabilities = np.array([[0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3]])
    scores = uncertainty_scores(probabilities, logits=np.log(probabilities) + 2.0)
    assert scores["max_softmax"] == pytest.approx([0.1, 2 / 3])
    assert scores["entropy"][1] == pytest.approx(np.log(3)) and scores["entropy"][0] < scores["entropy"][1]
    assert scores["energy"] == pytest.approx([-2.0, -2.0])  # logsumexp(log p + 2) = 2
    assert threshold_for(0.8, np.arange(10.0)) == 7.0  # 8 of 10 at or below
    assert threshold_for(1.0, np.arange(10.0)) == 9.0
    assert threshold_for(0.07, np.arange(100.0)) == 6.0  # 7 of 100, although 0.07 * 100 is 7.000000000000001
    reference = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    index = EmbeddingIndex(reference, k=3)
    queries = np.vstack([reference[:2] + 0.01, np.full((1, 4), np.nan)])
    distances = index.distances(queries)
    direct = np.sort(np.linalg.norm(reference[None] - queries[:2, None], axis=2), axis=1)[:, :3].mean(1)
    assert distances[:2] == pytest.approx(direct, abs=1e-5) and np.isnan(distances[2])


def test_the_curves_macro_f1_is_scikit_learns():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(2)
    for size in (5, 40):
        truth, predicted = rng.integers(0, 3, size), rng.integers(0, 4, size)
        assert macro_f1(truth, predicted) == pytest.approx(f1_score(truth, predicted, average="macro"), abs=1e-12)
