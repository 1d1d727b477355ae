"""Counts of a set of cells, read in row chunks as often as needed: from an AnnData in memory here, or
from an h5ad on disk (``h5ad.CanonicalCells.counts``: then memory is bounded by a chunk, whatever the
file's size).

The dictionaries (gene medians) and the tokenizer consume counts only through :class:`CellCounts`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import anndata as ad
import numpy as np
import scipy.sparse as sp

from geneformer_colon.data.canonical import as_csr, check_raw_counts, obs_n_counts, var_gene_ids

CHUNK_CELLS = 10_000
Chunk = tuple[sp.csr_matrix, np.ndarray]  # counts of consecutive cells (CSR), their n_counts (float64)


def row_chunks(counts: sp.csr_matrix, n_counts: np.ndarray, chunk_cells: int) -> Callable[[], Iterator[Chunk]]:
    """Chunks of an in-memory CSR matrix: ``chunk_cells`` rows at a time, views, no copy."""
    if chunk_cells < 1:
        raise ValueError(f"chunk_cells is {chunk_cells}; expected at least one cell")
    counts = sp.csr_matrix(counts)
    n_counts = np.asarray(n_counts, dtype=np.float64)

    def chunks() -> Iterator[Chunk]:
        for start in range(0, counts.shape[0], chunk_cells):
            stop = min(start + chunk_cells, counts.shape[0])
            indptr = counts.indptr[start : stop + 1]
            begin, end = indptr[0], indptr[-1]
            # Set the arrays on an empty matrix: the constructor copies a view of a larger array.
            chunk = sp.csr_matrix((stop - start, counts.shape[1]), dtype=counts.dtype)
            chunk.data, chunk.indices, chunk.indptr = counts.data[begin:end], counts.indices[begin:end], indptr - begin
            yield chunk, n_counts[start:stop]

    return chunks


@dataclass(frozen=True)
class CellCounts:
    """Cells' counts in chunks: ``chunks()`` starts a new pass over the cells, in order, each time.

    ``gene_ids``: the columns' gene ids and ``gene_field`` where they come from; ``source``
    names the input in errors.
    """

    chunks: Callable[[], Iterator[Chunk]]
    gene_ids: np.ndarray
    gene_field: str
    n_cells: int
    source: str

    @classmethod
    def from_anndata(cls, adata: ad.AnnData, source: str = "adata", chunk_cells: int = CHUNK_CELLS) -> CellCounts:
        """An AnnData in memory: X checked for raw counts; ``obs["n_counts"]`` when present, else row sums."""
        X = as_csr(adata.X, source)
        check_raw_counts(X.data, source)
        n_counts = obs_n_counts(adata.obs, X, adata.obs_names, source)
        if n_counts is None:
            n_counts = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()
        field, gene_ids = var_gene_ids(adata.var)

        return cls(row_chunks(X, n_counts, chunk_cells), gene_ids, field, X.shape[0], source)
