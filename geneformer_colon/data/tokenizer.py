"""Geneformer's rank-value encoding: each cell becomes its genes' tokens, most over-expressed first.

For the genes in both the token and the gene median dictionary, a cell's gene value is
``((count / n_counts) * 10_000) / median(gene)`` in float64; the cell's non-zero genes are
ordered by value, descending, ties in gene column order, and truncated to the input size.
V2 puts ``<cls>`` first and ``<eos>`` last. With a mapping dictionary, ids are upper-cased
and mapped, and the counts of columns that map to one gene are summed (as upstream does);
columns that share an id are one gene in any case, and a collapsed gene takes the place of
its first column.

The work is one pass of a compiled kernel (``kernels.ranking``) over the CSR matrix, run by a
thread per core on ranges of cells, that ranks each cell's genes straight into one flat token
array. (Threads rather than numba's ``parallel=True``: about a third less compile time on first
use.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import anndata as ad
import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from geneformer_colon.common.errors import InputError
from geneformer_colon.data.counts import CellCounts
from geneformer_colon.data.dictionaries import (
    FRAME_TOKENS,
    DictSource,
    GeneDictionaries,
    TokenizerSettings,
    special_token_ids,
)
from geneformer_colon.data.kernels.ranking import CellRows, Frame, GeneTable, TokenSlots, compact, rank_cells
from geneformer_colon.data.token_rows import TokenRows

log = logging.getLogger(__name__)

_CHUNK_NNZ = 1 << 24  # non-zeros per chunk: bounds the float64 copy of non-int32 counts (128 MB)


@dataclass(frozen=True)
class TokenizedCells(TokenRows):
    """Every cell's tokens, one cell after another; ``n_empty``: cells dropped for want of a gene."""

    tokens: np.ndarray
    offsets: np.ndarray
    n_empty: int

    def to_list(self) -> list[np.ndarray]:
        """One int64 array per cell (views of one array)."""
        tokens = self.tokens.astype(np.int64)
        return [tokens[start:stop] for start, stop in zip(self.offsets[:-1], self.offsets[1:])]


def _gene_plan(cells: CellCounts, dictionaries: GeneDictionaries, settings: TokenizerSettings) -> GeneTable:
    """Where each column's counts go (token ids as int64)."""
    field, raw_ids, source = cells.gene_field, cells.gene_ids, cells.source
    token, median, mapping = dictionaries.token, dictionaries.median, dictionaries.mapping
    ids = raw_ids.tolist() if mapping is None else [mapping.get(gene_id.upper()) for gene_id in raw_ids]
    kept = np.flatnonzero([gene_id in token and gene_id in median for gene_id in ids])
    if kept.size == 0:
        named = raw_ids[raw_ids != ""]
        example = repr(named[0]) if named.size else "none"
        mapped = " after upper-casing and mapping" if mapping is not None else ""
        raise InputError(
            f"{source}: none of the {raw_ids.size} gene ids in {field} (e.g. {example}) is in both the token "
            f"and the gene median dictionary{mapped}; give Ensembl ids in var['ensembl_id'] (map symbols with "
            f"gene_name_id_dict) and use the dictionaries of model_version {settings.model_version}"
        )
    codes, genes = pd.factorize(np.array([ids[column] for column in kept], dtype=object))  # first-column order
    column_gene = np.full(raw_ids.size, -1, dtype=np.int32)
    column_gene[kept] = codes
    return GeneTable(
        column_gene,
        np.array([token[gene] for gene in genes], dtype=np.int64),
        np.array([median[gene] for gene in genes], dtype=np.float64),
        np.bincount(codes, minlength=genes.size) > 1,
    )


def _pieces(indptr: np.ndarray, n_pieces: int) -> list[tuple[int, int]]:
    """Consecutive cell ranges [low, high) with about equal numbers of non-zeros."""
    n_cells = indptr.size - 1
    cuts = np.searchsorted(indptr, np.linspace(0, indptr[-1], n_pieces + 1)[1:-1])
    bounds = np.unique(np.concatenate([[0], np.clip(cuts, 0, n_cells), [n_cells]]))
    return [(int(low), int(high)) for low, high in zip(bounds[:-1], bounds[1:])]


def _chunks(X: sp.csr_matrix) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Consecutive cells of ``X`` as (first cell, indptr from 0, indices int32, data int32|float64).

    Canonical int32 counts pass as views; other dtypes are converted one chunk at a time.
    """
    n_cells = X.shape[0]
    nnz_before = X.indptr.astype(np.int64)
    start = 0
    while start < n_cells:
        stop = int(np.searchsorted(nnz_before, nnz_before[start] + _CHUNK_NNZ, side="right")) - 1
        stop = min(max(stop, start + 1), n_cells)
        low, high = nnz_before[start], nnz_before[stop]
        data = X.data[low:high]
        if data.dtype != np.int32:
            data = data.astype(np.float64)
        yield start, nnz_before[start : stop + 1] - low, X.indices[low:high].astype(np.int32, copy=False), data
        start = stop


@dataclass(frozen=True)
class _Encoding:
    """What every chunk of one tokenization shares: the gene table (tokens in the store's dtype), the frame."""

    genes: GeneTable
    frame: Frame
    n_frame: int

    @classmethod
    def of(cls, cells: CellCounts, dictionaries: GeneDictionaries, settings: TokenizerSettings) -> _Encoding:
        plan = _gene_plan(cells, dictionaries, settings)
        special = special_token_ids(dictionaries.token, settings.model_version)
        frame = [special[name] for name in FRAME_TOKENS[settings.model_version]]
        first, last = frame if frame else (-1, -1)
        dtype = np.uint16 if max(plan.token.max(), first, last) < 1 << 16 else np.int32
        return cls(plan._replace(token=plan.token.astype(dtype)), Frame(settings.gene_budget, first, last), len(frame))

    def encode(self, X: sp.csr_matrix, n_counts: np.ndarray, pool: ThreadPoolExecutor, threads: int
               ) -> TokenizedCells:
        """The tokens of the cells of ``X`` (room by each cell's non-zeros; filled, then compacted)."""
        row_nnz = np.diff(X.indptr)
        room = np.where(row_nnz > 0, np.minimum(row_nnz, self.frame.budget) + self.n_frame, 0)
        offsets = np.zeros(X.shape[0] + 1, dtype=np.int64)
        np.cumsum(room, out=offsets[1:])
        tokens = np.empty(int(offsets[-1]), dtype=self.genes.token.dtype)
        lengths = np.zeros(X.shape[0], dtype=np.int64)
        for start, indptr, indices, data in _chunks(X):
            n_cells = indptr.size - 1
            cells_n_counts = n_counts[start : start + n_cells]
            pieces = [
                pool.submit(
                    rank_cells,
                    CellRows(indptr[low : high + 1], indices, data, cells_n_counts[low:high]),
                    self.genes,
                    self.frame,
                    TokenSlots(offsets[start + low : start + high], tokens, lengths[start + low : start + high]),
                )
                for low, high in _pieces(indptr, 4 * threads)
            ]
            for piece in pieces:
                piece.result()
        if not np.array_equal(lengths, room):
            tokens.resize(compact(tokens, offsets, lengths), refcheck=False)
            np.cumsum(lengths, out=offsets[1:])
        return TokenizedCells(tokens, offsets, int((lengths == 0).sum()))


def tokenize_chunks(cells: CellCounts, dictionaries: GeneDictionaries, settings: TokenizerSettings
                    ) -> Iterator[TokenizedCells]:
    """Rank-value encode the cells chunk by chunk (cell order), one :class:`TokenizedCells` a chunk.

    A cell with no vocabulary gene gets no token at all (not even ``<cls>``/``<eos>``).
    """
    encoding = _Encoding.of(cells, dictionaries, settings)
    threads = numba.get_num_threads()
    with ThreadPoolExecutor(threads) as pool:  # the kernel releases the GIL
        for X, n_counts in cells.chunks():
            yield encoding.encode(X, n_counts, pool, threads)


def tokenize_cells(cells: CellCounts, dictionaries: GeneDictionaries, settings: TokenizerSettings) -> TokenizedCells:
    """Every cell's tokens in one :class:`TokenizedCells` (cell order); ``n_empty`` counts cells left empty."""
    parts = list(tokenize_chunks(cells, dictionaries, settings))
    if len(parts) == 1:
        return parts[0]
    lengths = np.concatenate([part.lengths for part in parts]) if parts else np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate([part.tokens for part in parts]) if parts else np.zeros(0, np.uint16)
    return TokenizedCells(tokens, offsets, sum(part.n_empty for part in parts))


def tokenize_anndata(
    adata: ad.AnnData,
    token_dictionary: DictSource,
    gene_median_dictionary: DictSource,
    gene_mapping: DictSource | None = None,
    model_version: str = "V1",
    input_size: int | None = None,
) -> list[np.ndarray]:
    """Geneformer's tokens of every cell of ``adata``, in obs order, one int64 array per cell.

    Each dictionary is a pickle path or a dict; ``gene_mapping`` is Geneformer's
    ``ensembl_mapping_dict``. A cell left with no vocabulary gene gets an empty array.
    """
    dictionaries = GeneDictionaries.load(token_dictionary, gene_median_dictionary, gene_mapping)
    cells = tokenize_cells(CellCounts.from_anndata(adata), dictionaries, TokenizerSettings(model_version, input_size))
    if cells.n_empty:
        log.warning(
            "%d of %d cells have no gene in the vocabulary: their token arrays are empty", cells.n_empty, len(cells)
        )
    return cells.to_list()
