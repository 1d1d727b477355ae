"""Counts of a set of cells, read in row chunks as often as needed: from an AnnData in memory, or
from a canonical ``.h5ad`` on disk (then memory is bounded by a chunk, whatever the file's size).

The dictionaries (gene medians) and the tokenizer consume counts only through :class:`CellCounts`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import anndata as ad
import numpy as np
import scipy.sparse as sp

from geneformer_colon.data.canonical import (
    N_COUNTS,
    as_csr,
    check_raw_counts,
    obs_n_counts,
    var_gene_ids,
)
from geneformer_colon.data.h5ad import CHUNK_CELLS, H5adReader

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

    @classmethod
    def from_canonical(cls, path: str | os.PathLike[str], source: str, rows: np.ndarray | None = None,
                       chunk_cells: int = CHUNK_CELLS) -> CellCounts:
        """A canonical h5ad on disk (already checked when it was written), optionally only the cells at
        the sorted positions ``rows``; ``source`` is the user's input it was made from."""
        with H5adReader(path) as file:
            n_cells = file.shape[0]
            n_counts = file.obs[N_COUNTS].to_numpy(dtype=np.float64)
            field, gene_ids = var_gene_ids(file.var)
        selected = np.arange(n_cells) if rows is None else np.asarray(rows, dtype=np.int64)

        def chunks() -> Iterator[Chunk]:
            with H5adReader(path) as file:
                for low in range(0, n_cells, chunk_cells):
                    high = min(low + chunk_cells, n_cells)
                    wanted = selected[np.searchsorted(selected, low) : np.searchsorted(selected, high)]
                    if len(wanted) == 0:
                        continue
                    block = sp.csr_matrix(file.rows(low, high))
                    if len(wanted) != high - low:
                        block = block[wanted - low]
                    yield block, n_counts[wanted]

        return cls(chunks, gene_ids, field, len(selected), source)
