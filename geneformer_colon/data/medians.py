"""Geneformer's gene medians computed exactly, out of core, from a stream of row chunks.

A gene's median is the median, over the cells where its count is positive, of
``(count / n_counts) * 10_000`` in float64 (divide first, then multiply, as
the tokenizer computes them); for an even number of values the mean of the two
middle ones, ``(a + b) / 2`` as ``np.median`` computes it; 0.0 for a gene with no value.
:func:`nonzero_medians` gives the same result bit for bit, but reads the cells as a sequence of
CSR row chunks, several times, and never needs more than one chunk of the matrix at a time.

Algorithm: a radix select per gene on the values' bit patterns
-------------------------------------------------------------
A positive float64 orders exactly like its IEEE-754 bit pattern read as an int64 (its *key*), so
the order statistics of a gene's values are those of its keys, and equal values are equal keys.
Gene ``g`` with ``n`` values needs the order statistics of ranks ``k1 = (n-1)//2`` and
``k2 = n//2`` (one rank when ``n`` is odd). Every pass reads all the chunks once and computes
each value exactly as the definition says; per gene still open it keeps a key interval
``[lo, hi)`` with ``below`` of the gene's values under ``lo`` and ``cnt`` inside, such that ranks
``k1`` and ``k2`` both fall inside (the invariant).

1. Histogram pass: every value is counted into one of 450 bins of its gene: 16 bins per octave
   (the exponent and the top 4 mantissa bits of the key) on [2^-14, 2^14), which holds every
   value of a cell of up to 1.6e8 counts (a value is at most 10,000 when ``count <= n_counts``),
   and one bin below and one above. A sweep over the histogram gives each gene its ``n`` and the
   bin(s) holding ranks ``k1`` and ``k2``: the first interval. Genes without a value: 0.0.
2. Selection passes, each gene in one of three ways:

   - *split*: ``k1`` and ``k2`` lie in two different bins (nothing between them), so ``k1`` is
     the largest value of the lower bin and ``k2`` the smallest of the upper one. The pass keeps
     those two extremes: the median, with no candidate memory.
   - *collect*: taking genes by increasing ``cnt`` while the budget of ``max_candidates`` values
     (over all genes) lasts, a gene copies the values inside its interval into its slice of one
     float64 buffer; after the pass a partition picks its ranks: exact.
   - *refine*: a gene that does not fit the budget counts its interval's values in at most 256
     equal key ranges, with the smallest and largest key seen. The next interval is the range
     holding ``k1`` and ``k2``, clipped to [smallest, largest] (or the two ranges, making the
     gene *split*). An interval one key wide, or whose smallest and largest keys are equal,
     holds copies of one value, which is then the median: that ends long runs of exact ties
     (e.g. a count of 1 in many cells of equal depth) without holding them.

Only integers are counted and compared, so the invariant holds exactly, and the order statistics
picked are float64 values computed as the definition computes them, combined as ``np.median``
combines them: the result is bit-identical to ``np.median`` of each gene's values in memory.
A refinement shrinks an interval's width in keys at least 256-fold (a width of at most 256
becomes 1) or makes it split, so a gene is done after at most 7 selection passes from a
histogram bin (2^48 keys), 9 from an edge bin: at most 8 passes in all (10 with values outside
[2^-14, 2^14)), usually 2, 3 when some median bins together hold more values than the budget.

Memory, besides the chunk that the caller's iterator holds: the pass-1 histogram, 450 x
``n_genes`` int32 (61 MB for 33,694 genes, freed after pass 1); ten int64/int8 arrays of
``n_genes``; and per selection pass at most ``max_candidates`` float64 candidates (64 MiB by
default) and a 256-range int32 sub-histogram per refining gene (at most 256 x ``n_genes``,
35 MB). None of it grows with the number of cells or non-zeros. The compiled kernels
(``kernels.median_select``) read each non-zero once per pass: no Python loop runs per cell or value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import scipy.sparse as sp

from geneformer_colon.data.kernels.median_select import (
    COLLECT,
    INF_KEY,
    N_INNER_BINS,
    REFINE,
    SKIP,
    SPLIT,
    SUB_BITS,
    histogram_pass,
    locate,
    narrow,
    range_shifts,
    select_collected,
    selection_pass,
)

ChunkSource = Callable[[], Iterable[tuple[sp.csr_matrix, np.ndarray]]]
"""Called once per pass; yields (counts of consecutive cells as CSR, genes as columns; their n_counts)."""

DEFAULT_MAX_CANDIDATES = 1 << 23  # float64 values held for the exact selection: 64 MiB

_MAX_CELLS = np.iinfo(np.int32).max  # the histograms count in int32


def nonzero_medians(chunks: ChunkSource, n_genes: int, *, max_candidates: int = DEFAULT_MAX_CANDIDATES) -> np.ndarray:
    """Per gene (column), the median of ``(count / n_counts) * 10_000`` over its positive counts.

    ``chunks()`` is called once per pass (usually twice, at most ten times) and must yield the
    same data each time: ``(counts, n_counts)`` pairs, ``counts`` a CSR matrix of some consecutive
    cells (``n_genes`` columns, integer or float dtype) and ``n_counts`` those cells' total
    counts. Entries <= 0 (stored zeros) are ignored. ``max_candidates`` bounds the values held at
    once for the exact selection; every bound, 0 included, gives the same result (a small one
    takes more passes). Returns float64 medians, 0.0 for a gene without a positive count:
    bit-identical to ``np.median`` of each gene's values with the whole matrix in memory.
    """
    if n_genes < 0:
        raise ValueError(f"n_genes is {n_genes}; expected a non-negative number of genes")
    if max_candidates < 0:
        raise ValueError(f"max_candidates is {max_candidates}; expected a non-negative number of values")
    hist = np.zeros((N_INNER_BINS + 2, n_genes), dtype=np.int32)
    n_cells = 0
    for first_cell, (indptr, indices, data, n_counts) in _chunk_arrays(chunks, n_genes):
        bad = histogram_pass(indptr, indices, data, n_counts, hist)
        if bad >= 0:
            raise ValueError(
                f"cell {first_cell + bad}: n_counts is {n_counts[bad]!r}; a cell with a positive count needs "
                "a positive finite n_counts (its total count)"
            )
        n_cells = first_cell + n_counts.size
        if n_cells > _MAX_CELLS:
            raise ValueError(f"more than {_MAX_CELLS} cells: beyond the int32 histograms")

    genes = _GeneState(n_genes)
    locate(hist, genes.n_values, genes.lo, genes.hi, genes.split, genes.below, genes.cnt)
    del hist
    medians = np.zeros(n_genes)
    open_genes = np.flatnonzero(genes.n_values > 0)
    passes = 1
    while open_genes.size:
        plan = _Plan(open_genes, genes, max_candidates)
        cells = 0
        for first_cell, (indptr, indices, data, n_counts) in _chunk_arrays(chunks, n_genes):
            overflow = selection_pass(
                indptr, indices, data, n_counts, plan.mode, plan.slot, genes.lo, genes.hi, genes.split,
                plan.shift, plan.buffer, plan.offset, plan.filled, plan.sub, plan.key_min, plan.key_max,
            )  # fmt: skip
            if overflow:
                raise _changed(passes)
            cells = first_cell + n_counts.size
        passes += 1
        if cells != n_cells or not plan.consistent(genes):
            raise _changed(passes - 1)
        open_genes = plan.finish(genes, medians)
    return medians


# ---- the driver's pieces ----


def _chunk_arrays(
    chunks: ChunkSource, n_genes: int
) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]]:
    """Each chunk as (its first cell's index, (indptr, indices, data, n_counts as float64)), checked."""
    first_cell = 0
    for counts, n_counts in chunks():
        if not sp.issparse(counts) or counts.format != "csr":
            raise TypeError(f"chunk at cell {first_cell}: counts is a {type(counts).__name__}, expected CSR")
        if counts.shape[1] != n_genes:
            raise ValueError(f"chunk at cell {first_cell}: {counts.shape[1]} genes (columns), expected {n_genes}")
        n_counts = np.ascontiguousarray(n_counts, dtype=np.float64).reshape(-1)
        if n_counts.size != counts.shape[0]:
            raise ValueError(f"chunk at cell {first_cell}: {counts.shape[0]} cells but {n_counts.size} n_counts")
        yield first_cell, (counts.indptr, counts.indices, counts.data, n_counts)
        first_cell += counts.shape[0]


def _changed(pass_number: int) -> ValueError:
    return ValueError(
        f"chunks() yielded other data in pass {pass_number + 1} than in pass 1; it must yield the same "
        "cells and counts on every call"
    )


class _GeneState:
    """Per gene: its number of values and the key interval [lo, hi) holding its middle ranks.

    ``below`` values lie under ``lo`` and ``cnt`` inside; ``split`` >= 0 when the two middle
    ranks lie on either side of it (the largest key below it and the smallest from it on).
    """

    def __init__(self, n_genes: int) -> None:
        self.n_values, self.lo, self.hi, self.below, self.cnt = (np.zeros(n_genes, dtype=np.int64) for _ in range(5))
        self.split = np.full(n_genes, -1, dtype=np.int64)


class _Plan:
    """One selection pass: genes that split, collect (into ``buffer``) or refine (into ``sub``)."""

    def __init__(self, genes_open: np.ndarray, genes: _GeneState, max_candidates: int) -> None:
        n_genes = genes.lo.size
        splitting = genes.split[genes_open] >= 0
        self.splitting = genes_open[splitting]
        rest = genes_open[~splitting]
        rest = rest[np.argsort(genes.cnt[rest], kind="stable")]
        fits = np.cumsum(genes.cnt[rest]) <= max_candidates
        self.collecting, self.refining = rest[fits], rest[~fits]

        self.mode = np.full(n_genes, SKIP, dtype=np.int8)
        self.slot = np.zeros(n_genes, dtype=np.int64)
        n_refining = self.refining.size
        for group, mode, first_slot in (
            (self.collecting, COLLECT, 0),
            (self.refining, REFINE, 0),
            (self.splitting, SPLIT, n_refining),  # after the refining genes in key_min / key_max
        ):
            self.mode[group] = mode
            self.slot[group] = np.arange(first_slot, first_slot + group.size)
        self.offset = np.zeros(self.collecting.size + 1, dtype=np.int64)
        np.cumsum(genes.cnt[self.collecting], out=self.offset[1:])
        self.buffer = np.empty(self.offset[-1])
        self.filled = np.zeros(self.collecting.size, dtype=np.int64)
        self.shift = np.zeros(n_genes, dtype=np.int64)  # a refining gene's ranges are 2^shift keys wide
        range_shifts(self.refining, genes.lo, genes.hi, self.shift)
        self.sub = np.zeros((n_refining, 1 << SUB_BITS), dtype=np.int32)
        self.key_min = np.full(n_refining + self.splitting.size, INF_KEY, dtype=np.int64)
        self.key_max = np.full(n_refining + self.splitting.size, -1, dtype=np.int64)

    def consistent(self, genes: _GeneState) -> bool:
        """Whether the pass found in each interval what the earlier passes counted there."""
        split_slots = self.refining.size + np.arange(self.splitting.size)
        return (
            np.array_equal(self.filled, np.diff(self.offset))
            and np.array_equal(genes.cnt[self.refining], self.sub.sum(axis=1, dtype=np.int64))
            and bool(np.all(self.key_max[split_slots] >= 0) and np.all(self.key_min[split_slots] < INF_KEY))
        )

    def finish(self, genes: _GeneState, medians: np.ndarray) -> np.ndarray:
        """The medians this pass settles, the refined intervals of the others; returns those still open."""
        split_slots = self.refining.size + np.arange(self.splitting.size)
        lower = self.key_max[split_slots].view(np.float64)  # rank k1: the largest value below split
        upper = self.key_min[split_slots].view(np.float64)  # rank k2: the smallest from split on
        medians[self.splitting] = (lower + upper) / 2  # n is even for a split gene
        select_collected(self.collecting, self.buffer, self.offset, genes.n_values, genes.below, medians)
        settled = np.zeros(self.refining.size, dtype=np.bool_)
        narrow(
            self.refining, self.sub, self.key_min, self.key_max, self.shift,
            genes.n_values, genes.lo, genes.hi, genes.split, genes.below, genes.cnt, medians, settled,
        )  # fmt: skip
        return self.refining[~settled]
