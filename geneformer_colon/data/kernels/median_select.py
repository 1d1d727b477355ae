"""The gene medians' compiled kernels: the passes of an exact radix select on float64 bit patterns.

``medians`` drives them (the algorithm is described there): :func:`histogram_pass` counts every
value into its gene's pass-1 bin, :func:`locate` finds each gene's first interval,
:func:`selection_pass` collects, sub-counts or takes the extremes of the values inside each open
gene's interval, and :func:`select_collected` and :func:`narrow` settle or shrink the intervals.
Each reads every non-zero of a chunk once: no Python loop runs per cell or per value.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from geneformer_colon.data.canonical import TARGET_SUM

# Pass-1 bins: 16 per octave on [2^-14, 2^14), one below, one above.
_MANTISSA_BITS = 52
_BIN_SHIFT = _MANTISSA_BITS - 4  # the top 4 mantissa bits: a bin is 2^48 keys wide
_KEY_LO = (1023 - 14) << _MANTISSA_BITS  # the key of 2^-14
_KEY_HI = (1023 + 14) << _MANTISSA_BITS  # the key of 2^14
N_INNER_BINS = (_KEY_HI - _KEY_LO) >> _BIN_SHIFT  # 448
INF_KEY = 0x7FF << _MANTISSA_BITS  # the key of +inf: every valid key is below it
SUB_BITS = 8  # a refinement cuts an interval into at most 2^8 ranges

# What a gene does in a selection pass.
SKIP, COLLECT, REFINE, SPLIT = 0, 1, 2, 3

@intrinsic
def _bits(typingctx, value):  # pragma: no cover - compiled
    """The IEEE-754 bit pattern of a float64 as an int64 (a bit cast, no conversion)."""
    if not isinstance(value, types.Float) or value.bitwidth != 64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int64))

    return types.int64(types.float64), codegen


@intrinsic
def _float(typingctx, key):  # pragma: no cover - compiled
    """The float64 whose bit pattern is the int64 ``key``."""
    if not isinstance(key, types.Integer) or key.bitwidth != 64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return types.float64(types.int64), codegen


@numba.njit(cache=True)
def _median_of(a, b, n):  # pragma: no cover - compiled
    """np.median's result from the middle order statistics ``a`` (rank (n-1)//2) and ``b`` (n//2)."""
    return a if n % 2 == 1 else (a + b) / 2


@numba.njit(cache=True, error_model="numpy")  # x / 0.0 is inf (refused), not an exception
def histogram_pass(indptr, indices, data, n_counts, hist):  # pragma: no cover - compiled
    """Count each positive entry's value into its gene's pass-1 bin; -1, or the row of a bad value."""
    for row in range(indptr.size - 1):
        norm = n_counts[row]
        for k in range(indptr[row], indptr[row + 1]):
            count = data[k]
            if count > 0:
                key = _bits((count / norm) * TARGET_SUM)
                if key <= 0 or key >= INF_KEY:  # not in (0, inf): n_counts is no positive finite total
                    return row
                below_lo = (key - _KEY_LO) >> _BIN_SHIFT  # negative below 2^-14
                hist[min(max(below_lo + 1, 0), N_INNER_BINS + 1), indices[k]] += 1
    return -1


@numba.njit(cache=True)
def _bin_lo(b):  # pragma: no cover - compiled
    return 0 if b == 0 else _KEY_LO + ((b - 1) << _BIN_SHIFT)


@numba.njit(cache=True)
def _bin_hi(b):  # pragma: no cover - compiled
    return INF_KEY if b == N_INNER_BINS + 1 else _KEY_LO + (b << _BIN_SHIFT)


@numba.njit(cache=True)
def locate(hist, n_values, lo, hi, split, below, cnt):  # pragma: no cover - compiled
    """From the pass-1 histogram, each gene's number of values and first interval (two sweeps)."""
    n_bins, n_genes = hist.shape
    for b in range(n_bins):
        for g in range(n_genes):
            n_values[g] += hist[b, g]
    seen = np.zeros(n_genes, dtype=np.int64)
    for b in range(n_bins):
        for g in range(n_genes):
            h = hist[b, g]
            if h == 0:
                continue
            start = seen[g]
            seen[g] = start + h
            if start <= (n_values[g] - 1) // 2 < start + h:
                lo[g] = _bin_lo(b)
                below[g] = start
            if start <= n_values[g] // 2 < start + h:
                hi[g] = _bin_hi(b)
                cnt[g] = start + h - below[g]
                if lo[g] != _bin_lo(b):  # ranks k1 and k2 in two bins
                    split[g] = _bin_lo(b)


@numba.njit(cache=True, error_model="numpy")  # x / 0.0 is inf (refused), not an exception
def selection_pass(
    indptr, indices, data, n_counts, mode, slot, lo, hi, split, shift, buffer, offset, filled, sub, key_min, key_max
):  # pragma: no cover - compiled
    """Collect, sub-count or take the extremes of the values inside each open gene's interval.

    True when a collecting gene has more values than the earlier passes counted (the data changed).
    """
    for row in range(indptr.size - 1):
        norm = n_counts[row]
        for k in range(indptr[row], indptr[row + 1]):
            count = data[k]
            if count > 0:
                g = indices[k]
                m = mode[g]
                if m == SKIP:
                    continue
                value = (count / norm) * TARGET_SUM
                from_lo = _bits(value) - lo[g]
                # lo <= key < hi as one unsigned comparison: rarely true, so a well-predicted branch
                if np.uint64(from_lo) >= np.uint64(hi[g] - lo[g]):
                    continue
                s = slot[g]
                if m == COLLECT:
                    at = offset[s] + filled[s]
                    if at >= offset[s + 1]:
                        return True
                    buffer[at] = value
                    filled[s] += 1
                    continue
                key = lo[g] + from_lo
                if m == REFINE:
                    sub[s, from_lo >> shift[g]] += 1
                    key_min[s] = min(key_min[s], key)
                    key_max[s] = max(key_max[s], key)
                elif key < split[g]:
                    key_max[s] = max(key_max[s], key)
                else:
                    key_min[s] = min(key_min[s], key)
    return False


@numba.njit(cache=True)
def select_collected(genes, buffer, offset, n_values, below, medians):  # pragma: no cover - compiled
    """The median of each collecting gene from the middle order statistics of its collected values."""
    for s in range(genes.size):
        g = genes[s]
        r1 = (n_values[g] - 1) // 2 - below[g]
        r2 = n_values[g] // 2 - below[g]
        part = np.partition(buffer[offset[s] : offset[s + 1]], r1)
        a = part[r1]
        b = a if r2 == r1 else part[r2:].min()
        medians[g] = _median_of(a, b, n_values[g])


@numba.njit(cache=True)
def range_shifts(genes, lo, hi, shift):  # pragma: no cover - compiled
    """Per refining gene, the smallest shift that cuts its interval into at most 2^SUB_BITS ranges."""
    for g in genes:
        last = hi[g] - lo[g] - 1  # the largest offset of a key from lo
        length = 0
        while last > 0:
            last >>= 1
            length += 1
        shift[g] = max(0, length - SUB_BITS)


@numba.njit(cache=True)
def narrow(
    genes, sub, key_min, key_max, shift, n_values, lo, hi, split, below, cnt, medians, settled
):  # pragma: no cover - compiled
    """Each refining gene's next interval from its ranges' counts, or its median when one value is left.

    The next interval is the range holding ranks k1 and k2, or the two ranges holding them (the
    gene then splits), clipped to the smallest and largest key seen in the interval.
    """
    for s in range(genes.size):
        g = genes[s]
        r1 = (n_values[g] - 1) // 2 - below[g]
        r2 = n_values[g] // 2 - below[g]
        seen = 0
        first = -1
        last = -1
        skipped = 0
        for j in range(sub.shape[1]):
            h = sub[s, j]
            if first < 0 and seen + h > r1:
                first = j
                skipped = seen
            seen += h
            if seen > r2:
                last = j
                break
        width = hi[g] - lo[g]
        end = (last + 1) << shift[g]  # at most 2^62, while lo + end may overflow
        new_hi = hi[g] if end >= width else lo[g] + end
        if last != first:
            split[g] = lo[g] + (last << shift[g])
        lo[g] = max(lo[g] + (first << shift[g]), key_min[s])
        hi[g] = min(new_hi, key_max[s] + 1)
        below[g] += skipped
        cnt[g] = seen - skipped
        if hi[g] - lo[g] == 1:  # one key (e.g. smallest == largest): copies of one value, the median
            value = _float(lo[g])
            medians[g] = _median_of(value, value, n_values[g])
            settled[s] = True
