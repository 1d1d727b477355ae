"""The synthetic cohort's compiled kernel: negative-binomial counts drawn by inverse CDF from a counter-based hash.

Each entry is drawn from a hash of (seed, cell, gene), so the counts are the same whatever the
thread count, and most zero entries cost one hash and one comparison. ``synthetic`` decides
the means (the cohort's biology); :func:`nb_counts` draws them into CSR arrays.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@numba.njit(inline="always")
def _uniform(key: np.uint64, i: int) -> float:
    """splitmix64 of (key, i) as a float in [0, 1): a counter-based, thread-independent stream."""
    z = key + np.uint64(i) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return float(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(inline="always")
def nb_inverse_cdf(u: float, mu: float, r: float) -> int:
    """The negative-binomial(mean mu, size r) quantile of u; zero cheaply when mu is small."""
    if u < 1.0 - mu:  # P(0) = (1 + mu/r)^-r >= exp(-mu) >= 1 - mu: zero without a pow
        return 0
    p = math.exp(-r * math.log1p(mu / r))
    cdf = p
    q = mu / (r + mu)
    k = 0
    while u >= cdf and (k < mu or p > 1e-20):
        k += 1
        p *= (k - 1 + r) / k * q
        cdf += p
    return k


@numba.njit(parallel=True, cache=True)
def nb_counts(
    key, library, group, donor, strength, profile, programme_genes, programme_lfc,
    inv_dispersion, indptr, indices, data, count_only,
):  # pragma: no cover - compiled
    """Draw every cell's counts; called twice, with the same draws.

    With ``count_only`` store cell c's number of non-zeros in ``indptr[c + 1]``; else fill
    ``indices``/``data`` from ``indptr``. Cell c's mean for gene g is its library size times
    its (donor, cell type) profile, times, for a programme gene (``programme_genes``, sorted),
    exp(sum over programmes k of strength[c, k] x programme_lfc[donor, k, gene]).
    """
    n_cells = library.size
    n_genes = profile.shape[1]
    n_programme = programme_genes.size
    n_programmes = strength.shape[1]
    for c in numba.prange(n_cells):
        log_fold = np.zeros(n_programme)
        lfc = programme_lfc[donor[c]]
        for k in range(n_programmes):
            if strength[c, k] != 0.0:
                for p in range(n_programme):
                    log_fold[p] += strength[c, k] * lfc[k, p]
        row = profile[group[c]]
        pos = 0 if count_only else indptr[c]
        nnz = 0
        p = 0
        for g in range(n_genes):
            mu = library[c] * row[g]
            if p < n_programme and programme_genes[p] == g:
                if log_fold[p] != 0.0:
                    mu *= math.exp(log_fold[p])
                p += 1
            k = nb_inverse_cdf(_uniform(key, c * n_genes + g), mu, inv_dispersion[g])
            if k > 0:
                if not count_only:
                    indices[pos + nnz] = g
                    data[pos + nnz] = k
                nnz += 1
        if count_only:
            indptr[c + 1] = nnz
