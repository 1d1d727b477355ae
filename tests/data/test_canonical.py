"""The canonical AnnData's checks and sums (canonical.py): row totals exact whatever the rows."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from geneformer_colon.data.canonical import row_totals


def test_row_totals_sum_each_row_exactly_with_empty_rows_anywhere() -> None:
    rng = np.random.default_rng(3)
    dense = rng.integers(1, 2**31 - 1, (2500, 40)) * (rng.random((2500, 40)) < 0.05)
    dense[[0, 1, 1023, 1024, 2498, 2499]] = 0  # empty rows at block edges and at the ends
    counts = sp.csr_matrix(dense.astype(np.int32))
    np.testing.assert_array_equal(row_totals(counts), np.asarray(counts.sum(axis=1, dtype=np.int64)).ravel())
    assert row_totals(sp.csr_matrix((3, 4), dtype=np.int32)).tolist() == [0, 0, 0]
