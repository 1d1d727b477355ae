"""The synthetic cohort's compiled kernel (negative_binomial.py): its counts are negative-binomial quantiles."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from geneformer_colon.data.kernels.negative_binomial import nb_inverse_cdf


@pytest.mark.parametrize(("mu", "r"), [(0.05, 2.0), (0.8, 0.7), (6.0, 3.0), (250.0, 1.5)])
def test_counts_are_negative_binomial_quantiles(mu: float, r: float) -> None:
    u = np.random.default_rng(7).random(2000)
    drawn = np.array([nb_inverse_cdf(x, mu, r) for x in u])
    expected = stats.nbinom.ppf(u, r, r / (r + mu))
    np.testing.assert_array_equal(drawn, expected)
