"""Geneformer's rank-value encoding: each cell becomes its genes' tokens, most over-expressed first.

For the genes in both the token and the gene median dictionary, a cell's gene value is
``((count / n_counts) * 10_000) / median(gene)`` in float64; the cell's non-zero genes are
ordered by value, descending, ties in gene column order, and truncated to the input size.
V2 puts ``<cls>`` first and ``<eos>`` last. With a mapping dictionary, ids are upper-cased
and mapped, and the counts of columns that map to one gene are summed (as upstream does);
columns that share an id are one gene in any case, and a collapsed gene takes the place of
its first column.

The work is one pass of a numba kernel over the CSR matrix, run by a thread per core on ranges
of cells, that ranks each cell's genes (an exact bucket sort) straight into one flat token
array: each cell has room for its number of non-zeros, and the array is compacted afterwards.
No dense copy, no Python per gene or per cell, and no memory beyond the output but a few rows
of scratch per thread. (Threads rather than numba's ``parallel=True``: about a third less
compile time on first use.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from geneformer_colon.data.canonical import TARGET_SUM
from geneformer_colon.data.counts import CellCounts
from geneformer_colon.data.dictionaries import (
    DictSource,
    GeneDictionaries,
    check_model_version,
    special_token_ids,
)
from geneformer_colon.data.token_rows import TokenRows
from geneformer_colon.errors import InputError

log = logging.getLogger(__name__)

INPUT_SIZE = {"V1": 2048, "V2": 4096}
# Tokens around a cell's genes: V1 has none, V2 starts with <cls> and ends with <eos>.
FRAME_TOKENS: dict[str, tuple[str, ...]] = {"V1": (), "V2": ("<cls>", "<eos>")}

_CHUNK_NNZ = 1 << 24  # non-zeros per chunk: bounds the float64 copy of non-int32 counts (128 MB)
_MAX_BUCKET_BITS = 14  # at most 16,384 buckets per cell
_SHORT_RUN = 32  # buckets up to this size are insertion-sorted


@dataclass(frozen=True)
class TokenizerSettings:
    """What shapes the token sequences (and so belongs in a token store's cache key)."""

    model_version: str = "V1"
    input_size: int | None = None

    def __post_init__(self) -> None:
        check_model_version(self.model_version)
        if self.input_size is not None and int(self.input_size) <= len(FRAME_TOKENS[self.model_version]):
            raise InputError(
                f"input_size {self.input_size} leaves no room for a gene; use a positive size "
                f"(default {INPUT_SIZE[self.model_version]} for {self.model_version})"
            )

    @property
    def resolved_input_size(self) -> int:
        """Tokens per cell at most, special tokens included."""
        return INPUT_SIZE[self.model_version] if self.input_size is None else int(self.input_size)

    @property
    def gene_budget(self) -> int:
        """Genes per cell at most."""
        return self.resolved_input_size - len(FRAME_TOKENS[self.model_version])


SETTINGS_FILE = "tokenizer_settings.json"


def save_settings(directory: Path, settings: TokenizerSettings, dictionaries: GeneDictionaries) -> None:
    """How cells were tokenized, beside a checkpoint's dictionaries (pretrain.py's hf/, an export)."""
    described = {**asdict(settings), "input_size": settings.resolved_input_size,
                 "gene_mapping": dictionaries.mapping is not None}
    (directory / SETTINGS_FILE).write_text(json.dumps(described, indent=2) + "\n")


def load_settings(directory: Path) -> dict[str, Any] | None:
    path = directory / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


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


@dataclass(frozen=True)
class _GenePlan:
    """Where each column's counts go: ``column_gene`` indexes ``token`` and ``median`` (-1: dropped)."""

    column_gene: np.ndarray
    token: np.ndarray
    median: np.ndarray
    shared: np.ndarray  # per gene: it has several columns


def _gene_plan(cells: CellCounts, dictionaries: GeneDictionaries, settings: TokenizerSettings) -> _GenePlan:
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
    return _GenePlan(
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


@numba.njit(cache=True)
def _after(values, genes, a, b):  # pragma: no cover - compiled
    """Whether position ``a`` ranks after position ``b``: lower value, or equal value and later gene."""
    return values[a] < values[b] or (values[a] == values[b] and genes[a] > genes[b])


@numba.njit(cache=True)
def _swap(values, genes, a, b):  # pragma: no cover - compiled
    values[a], values[b] = values[b], values[a]
    genes[a], genes[b] = genes[b], genes[a]


@numba.njit(cache=True)
def _sift_down(values, genes, start, node, size):  # pragma: no cover - compiled
    """Restore the heap (each parent ranks after its children) of ``size`` pairs from ``start`` below ``node``."""
    while 2 * node + 1 < size:
        child = 2 * node + 1
        if child + 1 < size and _after(values, genes, start + child + 1, start + child):
            child += 1
        if not _after(values, genes, start + child, start + node):
            return
        _swap(values, genes, start + node, start + child)
        node = child


@numba.njit(cache=True)
def _heapsort(values, genes, start, stop):  # pragma: no cover - compiled
    """Rank the pairs in [start, stop) in place: O(n log n) for a bucket too big for insertion sort."""
    size = stop - start
    for node in range(size // 2 - 1, -1, -1):
        _sift_down(values, genes, start, node, size)
    for end in range(size - 1, 0, -1):
        _swap(values, genes, start, start + end)
        _sift_down(values, genes, start, 0, end)


@numba.njit(cache=True)
def _bucket_range(bits, m, histogram):  # pragma: no cover - compiled
    """The (high, low) bit patterns that the buckets span: the values' range less its sparse tails.

    A few outlying values (a gene with a tiny median) would otherwise make every bucket
    coarse; the at most m/64 values beyond whole binary orders of magnitude at either end
    are put in the first or last bucket instead (still exactly sorted there).
    """
    high = bits[0]
    low = bits[0]
    for j in range(1, m):
        high = max(high, bits[j])
        low = min(low, bits[j])
    e_high = high >> 52  # the binary exponent: the values are positive, so the sign bit is 0
    e_low = low >> 52
    histogram[: e_high - e_low + 1] = 0
    for j in range(m):
        histogram[(bits[j] >> 52) - e_low] += 1
    tail = m >> 6
    top = e_high
    beyond = 0
    while top > e_low and beyond + histogram[top - e_low] <= tail:
        beyond += histogram[top - e_low]
        top -= 1
    bottom = e_low
    beyond = 0
    while bottom < top and beyond + histogram[bottom - e_low] <= tail:
        beyond += histogram[bottom - e_low]
        bottom += 1
    if top < e_high:
        high = ((top + 1) << 52) - 1
    if bottom > e_low:
        low = bottom << 52
    return high, low


@numba.njit(cache=True)
def _rank(values, genes, m, needed, bucket_of, histogram, ranked_values, ranked_genes):  # pragma: no cover
    """Put the first ``needed`` of the m (value, gene) pairs in ranked_*: value descending, ties by gene.

    A bucket sort on the top bits of the values' float64 bit patterns (for positive doubles
    the pattern rises with the value) followed by an exact sort inside each bucket up to
    position ``needed``: every exact tie shares a bucket, so the result is exact.
    """
    bits = values.view(np.int64)
    high, low = _bucket_range(bits, m, histogram)
    bucket_bits = 1
    while (1 << bucket_bits) < 2 * m and bucket_bits < _MAX_BUCKET_BITS:  # ~2 buckets a gene
        bucket_bits += 1
    width = 0
    while (high - low) >> width:
        width += 1
    shift = max(0, width - bucket_bits)
    n_buckets = ((high - low) >> shift) + 1
    histogram[: n_buckets + 1] = 0
    for j in range(m):
        bucket = (high - min(max(bits[j], low), high)) >> shift  # bucket 0 holds the largest values
        bucket_of[j] = bucket
        histogram[bucket + 1] += 1
    for bucket in range(n_buckets):
        histogram[bucket + 1] += histogram[bucket]
    for j in range(m):
        target = histogram[bucket_of[j]]
        histogram[bucket_of[j]] = target + 1
        ranked_values[target] = values[j]
        ranked_genes[target] = genes[j]
    start = 0
    bucket = 0
    while start < needed:  # histogram[bucket] is now where the bucket ends
        stop = histogram[bucket]
        if stop - start > _SHORT_RUN:
            _heapsort(ranked_values, ranked_genes, start, stop)
        else:  # insertion sort, inline: most buckets hold one or two genes
            for i in range(start + 1, stop):
                j = i
                while j > start and _after(ranked_values, ranked_genes, j - 1, j):
                    _swap(ranked_values, ranked_genes, j - 1, j)
                    j -= 1
        start = stop
        bucket += 1


@numba.njit(nogil=True, cache=True)
def _rank_cells(
    indptr,
    indices,
    data,
    column_gene,
    gene_token,
    gene_median,
    shared,
    n_counts,
    budget,
    first,
    last,
    offsets,
    out,
    lengths,
):  # pragma: no cover - compiled
    """Write each cell's tokens at ``out[offsets[cell]:]`` and their number at ``lengths[cell]``.

    ``shared``: per gene, whether it has several columns, whose counts are summed (so are the
    duplicate entries of a row whose columns are out of order). ``n_counts`` empty: a cell's
    total is its row sum. ``first``/``last``: the token before/after the genes, -1 for none.
    """
    n_cells = indptr.size - 1
    n_genes = gene_token.size
    collapses = shared.any()
    widest = 1
    for cell in range(n_cells):
        widest = max(widest, indptr[cell + 1] - indptr[cell])
    summed = np.zeros(n_genes, dtype=np.float64)
    genes = np.empty(widest, dtype=np.int32)
    values = np.empty(widest, dtype=np.float64)
    ranked_genes = np.empty(widest, dtype=np.int32)
    ranked_values = np.empty(widest, dtype=np.float64)
    bucket_of = np.empty(widest, dtype=np.int64)
    histogram = np.empty((1 << _MAX_BUCKET_BITS) + 1, dtype=np.int64)
    for cell in range(n_cells):
        m = 0
        previous = -1
        disorder = False
        for k in range(indptr[cell], indptr[cell + 1]):  # branch-free: most columns are genes
            column = indices[k]
            gene = column_gene[column]
            genes[m] = gene
            values[m] = data[k]
            m += (gene >= 0) & (data[k] > 0)
            disorder |= column <= previous
            previous = column
        if collapses or disorder:  # one entry per gene: sum the counts of its columns
            distinct = 0
            for j in range(m):
                gene = genes[j]
                if disorder or shared[gene]:
                    if summed[gene] == 0:
                        genes[distinct] = gene
                        distinct += 1
                    summed[gene] += values[j]
                else:
                    genes[distinct] = gene
                    values[distinct] = values[j]
                    distinct += 1
            m = distinct
            for j in range(m):
                gene = genes[j]
                if disorder or shared[gene]:
                    values[j] = summed[gene]
                    summed[gene] = 0
        if m == 0:
            continue
        if n_counts.size:
            n = n_counts[cell]
        else:
            total = 0  # int64 for integer counts, float64 for float ones: exact either way
            for k in range(indptr[cell], indptr[cell + 1]):
                total += data[k]
            n = np.float64(total)
        for j in range(m):
            values[j] = ((values[j] / n) * TARGET_SUM) / gene_median[genes[j]]
        kept = min(m, budget)
        _rank(values, genes, m, kept, bucket_of, histogram, ranked_values, ranked_genes)
        position = offsets[cell]
        if first >= 0:
            out[position] = first
            position += 1
        for j in range(kept):
            out[position + j] = gene_token[ranked_genes[j]]
        if last >= 0:
            out[position + kept] = last
        lengths[cell] = kept + (first >= 0) + (last >= 0)


@numba.njit(cache=True)
def _compact(out, offsets, lengths):  # pragma: no cover - compiled
    """Move each cell's tokens from ``offsets`` down to back-to-back; return the number of tokens."""
    position = 0
    for cell in range(lengths.size):
        source = offsets[cell]
        for j in range(lengths[cell]):
            out[position + j] = out[source + j]
        position += lengths[cell]
    return position


@dataclass(frozen=True)
class _Encoding:
    """What every chunk of one tokenization shares: the gene plan, the frame tokens, the token dtype."""

    plan: _GenePlan
    first: int
    last: int
    n_frame: int
    dtype: type
    gene_budget: int

    @classmethod
    def of(cls, cells: CellCounts, dictionaries: GeneDictionaries, settings: TokenizerSettings) -> _Encoding:
        plan = _gene_plan(cells, dictionaries, settings)
        special = special_token_ids(dictionaries.token, settings.model_version)
        frame = [special[name] for name in FRAME_TOKENS[settings.model_version]]
        first, last = frame if frame else (-1, -1)
        dtype = np.uint16 if max(plan.token.max(), first, last) < 1 << 16 else np.int32
        return cls(plan, first, last, len(frame), dtype, settings.gene_budget)

    def encode(self, X: sp.csr_matrix, n_counts: np.ndarray, pool: ThreadPoolExecutor, threads: int
               ) -> TokenizedCells:
        """The tokens of the cells of ``X`` (room by each cell's non-zeros; filled, then compacted)."""
        row_nnz = np.diff(X.indptr)
        room = np.where(row_nnz > 0, np.minimum(row_nnz, self.gene_budget) + self.n_frame, 0)
        offsets = np.zeros(X.shape[0] + 1, dtype=np.int64)
        np.cumsum(room, out=offsets[1:])
        tokens = np.empty(int(offsets[-1]), dtype=self.dtype)
        lengths = np.zeros(X.shape[0], dtype=np.int64)
        gene_tokens = self.plan.token.astype(self.dtype)
        for start, indptr, indices, data in _chunks(X):
            n_cells = indptr.size - 1
            cells_n_counts = n_counts[start : start + n_cells]
            pieces = [
                pool.submit(
                    _rank_cells,
                    indptr[low : high + 1],
                    indices,
                    data,
                    self.plan.column_gene,
                    gene_tokens,
                    self.plan.median,
                    self.plan.shared,
                    cells_n_counts[low:high],
                    self.gene_budget,
                    self.first,
                    self.last,
                    offsets[start + low : start + high],
                    tokens,
                    lengths[start + low : start + high],
                )
                for low, high in _pieces(indptr, 4 * threads)
            ]
            for piece in pieces:
                piece.result()
        if not np.array_equal(lengths, room):
            tokens.resize(_compact(tokens, offsets, lengths), refcheck=False)
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
