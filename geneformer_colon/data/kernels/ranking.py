"""The tokenizer's compiled kernels: rank each cell's genes (an exact bucket sort) into its token slots.

One call of :func:`rank_cells` ranks a range of cells (a thread's share of a chunk) straight into one
flat token array, where each cell has room for its number of non-zeros; :func:`compact` then moves
the cells' tokens back to back. No dense copy, no Python per gene or per cell, and no memory beyond
the output but a few rows of scratch per call. The arrays travel as four named tuples (numba reads
their fields as it reads separate arguments).
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from geneformer_colon.data.canonical import TARGET_SUM

_MAX_BUCKET_BITS = 14  # at most 16,384 buckets per cell
_SHORT_RUN = 32  # buckets up to this size are insertion-sorted


class CellRows(NamedTuple):
    """Consecutive cells' counts as CSR arrays, and their totals (empty: a cell's total is its row sum)."""

    indptr: np.ndarray  # int64, from 0
    indices: np.ndarray  # int32 columns
    data: np.ndarray  # int32 or float64 counts
    n_counts: np.ndarray  # float64 per cell, or empty


class GeneTable(NamedTuple):
    """Where each column's counts go: ``column_gene`` indexes the per-gene arrays (-1: the column is dropped)."""

    column_gene: np.ndarray  # int32 per column
    token: np.ndarray  # per gene, in the token store's dtype
    median: np.ndarray  # float64 per gene
    shared: np.ndarray  # bool per gene: it has several columns


class Frame(NamedTuple):
    """Genes per cell at most, and the token before and after them (-1: none)."""

    budget: int
    first: int
    last: int


class TokenSlots(NamedTuple):
    """Where cells' tokens go: cell i's from ``tokens[offsets[i]]``, ``lengths[i]`` of them."""

    offsets: np.ndarray  # int64 per cell
    tokens: np.ndarray
    lengths: np.ndarray  # int64 per cell, written by the kernel


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
def rank_cells(cells, plan, frame, slots):  # pragma: no cover - compiled
    """Write each cell's tokens at ``slots.tokens[slots.offsets[cell]:]`` and their number at ``slots.lengths[cell]``.

    ``cells``: :class:`CellRows`; ``plan``: :class:`GeneTable` (a gene with several columns has their
    counts summed, and so have the duplicate entries of a row whose columns are out of order);
    ``frame``: :class:`Frame`; ``slots``: :class:`TokenSlots`.
    """
    indptr, indices, data, n_counts = cells
    column_gene, gene_token, gene_median, shared = plan
    budget, first, last = frame
    offsets, out, lengths = slots
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
def compact(out, offsets, lengths):  # pragma: no cover - compiled
    """Move each cell's tokens from ``offsets`` down to back-to-back; return the number of tokens."""
    position = 0
    for cell in range(lengths.size):
        source = offsets[cell]
        for j in range(lengths[cell]):
            out[position + j] = out[source + j]
        position += lengths[cell]
    return position
