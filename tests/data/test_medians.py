"""Out-of-core gene medians: bit-identical to a plain numpy median of every gene, in memory."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from geneformer_colon.data.canonical import TARGET_SUM
from geneformer_colon.data.counts import row_chunks
from geneformer_colon.data.medians import nonzero_medians


def _numpy_medians(counts: sp.csr_matrix, n_counts: np.ndarray) -> np.ndarray:
    """The definition, one gene at a time: np.median of (count / n_counts) * 10,000 over positive counts."""
    by_gene = counts.tocsc()
    medians = np.zeros(counts.shape[1])
    for gene in range(counts.shape[1]):
        span = slice(by_gene.indptr[gene], by_gene.indptr[gene + 1])
        values, cells = by_gene.data[span], by_gene.indices[span]
        positive = values > 0
        if positive.any():
            medians[gene] = np.median((values[positive] / n_counts[cells[positive]]) * TARGET_SUM)
    return medians


class _Counted:
    """A chunk source that counts its calls (one per pass)."""

    def __init__(self, counts: sp.csr_matrix, n_counts: np.ndarray, chunk_cells: int) -> None:
        self.source = row_chunks(counts, n_counts, chunk_cells)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.source()


def _assert_bits_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.float64
    np.testing.assert_array_equal(actual.view(np.int64), expected.view(np.int64))


def _check(counts, n_counts, chunk_cells=7, max_candidates=1 << 23) -> tuple[np.ndarray, int]:
    """Our medians, checked bit for bit against numpy; returns them and the pass count."""
    source = _Counted(counts, n_counts, chunk_cells)
    medians = nonzero_medians(source, counts.shape[1], max_candidates=max_candidates)
    expected = _numpy_medians(counts, n_counts)
    _assert_bits_equal(medians, expected)
    return medians, source.calls


def _random_counts(
    seed: int, n_cells: int = 300, n_genes: int = 60, dtype=np.int32
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Sparse counts (mostly 1s, some large), densities from 0 to 90% per gene, n_counts >= row sums."""
    rng = np.random.default_rng(seed)
    density = rng.uniform(0.0, 0.9, n_genes)
    dense = np.where(rng.random((n_cells, n_genes)) < density, rng.geometric(0.6, (n_cells, n_genes)), 0)
    dense[:, :2] = 0  # two genes without a value
    dense[:, 2] = 0
    dense[rng.integers(n_cells), 2] = 3  # a gene with one value
    counts = sp.csr_matrix(dense.astype(dtype))
    n_counts = dense.sum(axis=1) + rng.integers(0, 5_000, n_cells).astype(np.float64)
    n_counts[n_counts == 0] = 1.0
    return counts, n_counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_counts_match_numpy(seed):
    counts, n_counts = _random_counts(seed)
    per_gene = np.diff(counts.tocsc().indptr)
    assert {0, 1} <= set(per_gene % 2) and 0 in per_gene and 1 in per_gene  # odd, even, none, one
    medians, passes = _check(counts, n_counts)
    assert passes == 2
    assert medians[0] == medians[1] == 0.0 and medians[2] == (3 / n_counts[counts[:, 2].nonzero()[0][0]]) * TARGET_SUM


def test_every_chunk_size_gives_the_same_medians():
    counts, n_counts = _random_counts(3, n_cells=40, n_genes=25)
    expected = _numpy_medians(counts, n_counts)
    for chunk_cells in range(1, counts.shape[0] + 1):
        _assert_bits_equal(nonzero_medians(row_chunks(counts, n_counts, chunk_cells), counts.shape[1]), expected)


def test_exact_ties_all_counts_one_and_equal_depth():
    rng = np.random.default_rng(4)
    counts = sp.random(500, 30, density=0.4, format="csr", random_state=rng, data_rvs=np.ones).astype(np.int32)
    n_counts = np.full(500, 1_234.0)
    for max_candidates in (0, 3, 1 << 23):
        medians, _ = _check(counts, n_counts, chunk_cells=64, max_candidates=max_candidates)
        assert np.all(medians == (1 / 1_234.0) * TARGET_SUM)


def test_median_on_a_long_run_of_ties_among_other_values():
    """Half the values are one tied value with the median inside the run, the rest spread out."""
    rng = np.random.default_rng(5)
    n_cells = 2_001
    counts = np.ones((n_cells, 3), dtype=np.int32)
    counts[:, 1] = rng.integers(1, 50, n_cells)
    counts[1::2, 2] = 0  # an odd and an even gene (1,001 values)
    n_counts = np.where(rng.random(n_cells) < 0.6, 1_000.0, rng.integers(100, 100_000, n_cells).astype(np.float64))
    for max_candidates in (0, 10, 1 << 23):
        _check(sp.csr_matrix(counts), n_counts, chunk_cells=333, max_candidates=max_candidates)


def test_small_candidate_budget_forces_refinement_passes():
    counts, n_counts = _random_counts(6, n_cells=3_000, n_genes=40)
    n_counts += np.random.default_rng(6).random(counts.shape[0])  # distinct depths: few ties
    _, passes = _check(counts, n_counts, chunk_cells=500)
    assert passes == 2
    for max_candidates in (0, 1, 50, 500):
        _, passes = _check(counts, n_counts, chunk_cells=500, max_candidates=max_candidates)
        assert 2 < passes <= 8


def test_extreme_depths_and_values_outside_the_binned_range():
    """n_counts of 1 and 10^7, and medians beyond [2^-14, 2^14): counts above n_counts, depths of 10^13."""
    rng = np.random.default_rng(7)
    n_cells = 600
    kind = rng.integers(0, 3, n_cells)  # shallow cells (1-10), enormous ones (10^12-10^14), exactly 1 or 10^7
    n_counts = np.select(
        [kind == 0, kind == 1],
        [rng.integers(1, 11, n_cells).astype(np.float64), 10.0 ** rng.uniform(12, 14, n_cells)],
        rng.choice([1.0, 1e7], n_cells),
    )
    dense = np.where(rng.random((n_cells, 12)) < 0.5, rng.integers(1, 1_000, (n_cells, 12)), 0).astype(np.float64)
    dense[kind != 0, :4] = 0  # genes 0-3 in shallow cells only: values above 2^14
    dense[kind != 1, 4:8] = 0  # genes 4-7 in enormous cells only: values below 2^-14
    counts = sp.csr_matrix(dense)
    for max_candidates in (0, 1 << 23):
        medians, _ = _check(counts, n_counts, chunk_cells=50, max_candidates=max_candidates)
    assert np.all(medians[:4] > 2.0**14) and np.all(medians[4:8] < 2.0**-14)
    one_value = sp.csr_matrix(np.array([[1], [0], [7]], dtype=np.int32))
    _check(one_value, np.array([1.0, 5.0, 1e7]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_float_and_wide_integer_counts(dtype):
    counts, n_counts = _random_counts(8, dtype=dtype)
    _check(counts, n_counts)


def test_stored_zeros_and_empty_inputs():
    counts = sp.csr_matrix(
        (np.array([0, 2, 0, 1], np.int32), np.array([0, 1, 1, 2]), np.array([0, 2, 4])), shape=(2, 4)
    )
    medians, _ = _check(counts, np.array([10.0, 4.0]))
    assert medians[0] == medians[3] == 0.0
    assert nonzero_medians(lambda: iter(()), 3).tolist() == [0.0, 0.0, 0.0]
    assert nonzero_medians(row_chunks(sp.csr_matrix((5, 0), dtype=np.int32), np.ones(5), 2), 0).shape == (0,)


def test_bad_inputs_are_refused():
    counts, n_counts = _random_counts(9, n_cells=20, n_genes=6)
    with pytest.raises(ValueError, match="n_genes"):
        nonzero_medians(row_chunks(counts, n_counts, 5), -1)
    with pytest.raises(ValueError, match="chunk at cell 0: 6 genes"):
        nonzero_medians(row_chunks(counts, n_counts, 5), 7)
    with pytest.raises(TypeError, match="expected CSR"):
        nonzero_medians(lambda: iter([(counts.tocsc(), n_counts)]), 6)
    with pytest.raises(ValueError, match="5 cells but 4 n_counts"):
        nonzero_medians(lambda: iter([(counts[:5], n_counts[:4])]), 6)
    zero_depth = n_counts.copy()
    zero_depth[np.flatnonzero(np.diff(counts.indptr))[-1]] = 0.0
    with pytest.raises(ValueError, match="positive finite n_counts"):
        nonzero_medians(row_chunks(counts, zero_depth, 5), 6)


def test_data_changing_between_passes_is_detected():
    counts, n_counts = _random_counts(10, n_cells=50, n_genes=8)
    calls = []

    def chunks():
        calls.append(None)
        return row_chunks(counts if len(calls) == 1 else counts[:25], n_counts, 10)()

    with pytest.raises(ValueError, match="other data in pass 2"):
        nonzero_medians(chunks, 8)
