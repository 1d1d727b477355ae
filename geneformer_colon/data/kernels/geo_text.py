"""GEO text's compiled kernels: parse gene rows of integer counts to sparse form, and format them back.

``kul3`` reads and writes the files; these two loops are its per-byte work.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def parse_rows(buf, pos, n_cells, indices, data, row_nnz, spans):  # pragma: no cover - compiled
    """Parse whole lines ``symbol\\tc1\\t...\\tcN\\n`` of plain integer counts from ``pos``.

    Writes the non-zeros to ``indices``/``data``, each row's count to ``row_nnz`` and its symbol's
    byte span to ``spans``. Returns (position, rows, non-zeros); stops early (position at the
    line start) at a line that is not plain or when ``spans`` is full.
    """
    n = buf.size
    rows = 0
    nnz = 0
    while pos < n and rows < spans.shape[0]:
        line = pos
        while pos < n and buf[pos] != 9 and buf[pos] != 10:
            pos += 1
        name_end = pos
        first = nnz
        cell = 0
        plain = True
        while plain and pos < n and buf[pos] == 9:
            pos += 1
            value = 0
            digits = 0
            while pos < n and 48 <= buf[pos] <= 57 and digits < 10:
                value = value * 10 + (buf[pos] - 48)
                digits += 1
                pos += 1
            plain = digits > 0 and cell < n_cells and value <= 2147483647
            plain = plain and pos < n and (buf[pos] == 9 or buf[pos] == 10)
            if plain and value != 0:
                indices[nnz] = cell
                data[nnz] = value
                nnz += 1
            cell += 1
        if not plain or cell != n_cells or pos >= n or buf[pos] != 10:
            return line, rows, first
        pos += 1
        spans[rows, 0] = line
        spans[rows, 1] = name_end
        row_nnz[rows] = nnz - first
        rows += 1
    return pos, rows, nnz


@numba.njit(nogil=True, cache=True)
def format_rows(
    indptr, indices, data, g0, g1, n_cells, name_bytes, name_offsets, out
):  # pragma: no cover - compiled
    """Format genes g0..g1 of a CSC matrix as text rows ``symbol\\tv1\\tv2...\\n`` into ``out``."""
    pos = 0
    digits = np.empty(12, np.uint8)
    for g in range(g0, g1):
        for b in range(name_offsets[g], name_offsets[g + 1]):
            out[pos] = name_bytes[b]
            pos += 1
        nxt = indptr[g]
        end = indptr[g + 1]
        for c in range(n_cells):
            out[pos] = 9  # tab
            pos += 1
            if nxt < end and indices[nxt] == c:
                v = data[nxt]
                nxt += 1
                n = 0
                while True:
                    digits[n] = 48 + v % 10
                    v //= 10
                    n += 1
                    if v == 0:
                        break
                for i in range(n - 1, -1, -1):
                    out[pos] = digits[i]
                    pos += 1
            else:
                out[pos] = 48  # "0"
                pos += 1
        out[pos] = 10  # newline
        pos += 1
    return pos
