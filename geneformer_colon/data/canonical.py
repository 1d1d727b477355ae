"""The canonical AnnData: the one contract between the readers and everything downstream.

Every data source (the KUL3 GEO reader, the h5ad reader, the synthetic generator through the
GEO reader) gives its cells in this form, and the dictionaries, the tokenizer and the token store
consume them (through ``h5ad.CanonicalCells``):

- ``X``: CSR int32 raw UMI counts, cells x genes;
- ``obs`` (index: cell id, unique): ``donor``, ``label``, ``cell_type``, ``sample`` (categorical
  strings; ``cell_type`` is "unknown" for data without cell types) and ``n_counts`` (int64 total
  counts of the cell over all genes, before any gene is dropped); readers may add columns;
- ``var`` (index: gene symbol, or the source's own var index): ``symbol`` and ``ensembl_id``
  (strings, "" where the gene has no Ensembl id).

A format that must be parsed (GEO text) is written to disk once in row chunks
(:func:`write_canonical`); an h5ad of counts is read where it is, its columns mapped and its
counts checked chunk by chunk as they are read. Neither needs the whole matrix in memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import sparse_dataset, write_elem

from geneformer_colon.common.errors import InputError

log = logging.getLogger(__name__)

# Geneformer normalises each cell to this many counts before dividing by the gene medians.
TARGET_SUM = 10_000
OBS_COLUMNS = ("donor", "label", "cell_type", "sample")
N_COUNTS = "n_counts"
VAR_COLUMNS = ("symbol", "ensembl_id")
UNKNOWN_CELL_TYPE = "unknown"
_INT32_MAX = np.iinfo(np.int32).max
_ROWS_PER_SUM = 1024  # rows summed at once: bounds the int64 copy of their counts


def names_text(names: Iterable[Any]) -> str:
    names = [str(name) for name in names]
    return ", ".join(names) if names else "none"


def _show(value: object) -> str:
    return repr(value.item() if isinstance(value, np.generic) else value)


# ---- counts ----


def count_problem(values: np.ndarray) -> tuple[int, str] | None:
    """(flat index, what) of the first value that is not a count fitting int32, or None."""
    if values.dtype.kind not in "biuf":
        numeric = pd.to_numeric(pd.Series(values.ravel()), errors="coerce").to_numpy()
        bad = np.isnan(numeric)
        if bad.any():
            return int(np.argmax(bad)), "non-numeric"
        values = numeric
    checks = [(values < 0, "negative"), (values > _INT32_MAX, "too large (> 2^31-1)")]
    if values.dtype.kind == "f":
        checks.insert(0, (~np.isfinite(values) | (values != np.floor(values)), "fractional"))
    first = None
    for bad, what in checks:
        if bad.any():
            index = int(np.argmax(bad.ravel()))
            if first is None or index < first[0]:
                first = (index, what)
    return first


def count_csr(matrix: Any, where: str, obs_names: pd.Index, var_names: pd.Index, fix: str) -> sp.csr_matrix:
    """Counts of some cells (dense or sparse) as canonical CSR int32, after checking they are counts.

    ``where`` names the file and field, ``fix`` says what to do; both go into the error.
    """
    if sp.issparse(matrix):
        csr = sp.csr_matrix(matrix)
        csr.sum_duplicates()
        problem = count_problem(csr.data)
        if problem is not None:
            flat = problem[0]
            row, col = int(np.searchsorted(csr.indptr, flat, side="right")) - 1, csr.indices[flat]
            value = csr.data[flat]
    else:
        dense = np.asarray(matrix)
        problem = count_problem(dense)
        if problem is not None:
            row, col = divmod(problem[0], dense.shape[1])
            value = dense.flat[problem[0]]
        csr = sp.csr_matrix(dense)
    if problem is not None:
        raise InputError(
            f"{where} holds a {problem[1]} value {_show(value)} (cell '{obs_names[row]}', gene "
            f"'{var_names[col]}'); it must hold raw UMI counts: {fix}"
        )
    csr = sp.csr_matrix((csr.data.astype(np.int32, copy=False), csr.indices, csr.indptr), shape=csr.shape)
    csr.eliminate_zeros()
    csr.sort_indices()
    return csr


def row_totals(counts: sp.csr_matrix) -> np.ndarray:
    """Each row's sum as int64, summed a block of rows at a time (``counts.sum`` casts all non-zeros at once)."""
    totals = np.zeros(counts.shape[0], dtype=np.int64)
    indptr = counts.indptr
    for low in range(0, counts.shape[0], _ROWS_PER_SUM):
        high = min(low + _ROWS_PER_SUM, counts.shape[0])
        filled = low + np.flatnonzero(np.diff(indptr[low : high + 1]))
        if filled.size:  # an empty row adds nothing to the range of the filled row before it
            block = counts.data[indptr[low] : indptr[high]]
            totals[filled] = np.add.reduceat(block, indptr[filled] - indptr[low], dtype=np.int64)
    return totals


def check_raw_counts(data: np.ndarray, source: str) -> None:
    """Refuse anything but raw integer UMI counts (the non-zeros of an expression matrix)."""
    if data.size == 0:
        return
    if np.issubdtype(data.dtype, np.integer):
        bad = data[data < 0][:1] if data.min() < 0 else data[:0]
    else:
        bad = np.empty(0, dtype=data.dtype)
        for start in range(0, data.size, 1 << 22):  # chunks: no temporary the size of the matrix
            chunk = data[start : start + (1 << 22)]
            wrong = ~np.isfinite(chunk) | (chunk < 0) | (chunk != np.floor(chunk))
            if wrong.any():
                bad = chunk[wrong][:1]
                break
    if bad.size:
        raise InputError(
            f"{source}: X holds {bad[0].item()!r}, not a raw count; Geneformer needs raw integer UMI counts "
            "(not normalised, log-transformed or scaled values): give the raw count matrix as X"
        )


def as_csr(X: Any, source: str) -> sp.csr_matrix:
    """``X`` as a CSR matrix: no copy when it already is one, never a dense copy of a sparse one."""
    if sp.issparse(X):
        return sp.csr_matrix(X) if X.format != "csr" else X
    if isinstance(X, np.ndarray):
        return sp.csr_matrix(X)
    raise InputError(
        f"{source}: X is a {type(X).__name__}; load the AnnData into memory (read_h5ad without "
        "backed=, or adata.to_memory()) so that X is a numpy or scipy.sparse matrix"
    )


# ---- obs and var ----


def obs_strings(obs: pd.DataFrame, key: str, path: Path, config: str, what: str) -> np.ndarray:
    """An obs column as strings, after checking it exists and is filled for every cell."""
    if key not in obs.columns:
        raise InputError(
            f"{path}: obs column '{key}' missing (columns: {names_text(obs.columns)}); set {config} to {what}"
        )
    column = obs[key]
    if column.isna().any():
        raise InputError(
            f"{path}: obs column '{key}' is empty for {int(column.isna().sum())} cells "
            f"(e.g. '{obs.index[column.isna().to_numpy()][0]}'); fill it or drop those cells"
        )
    return column.astype(str).to_numpy(dtype=object)


def obs_n_counts(obs: pd.DataFrame, X: sp.csr_matrix, obs_names: pd.Index, source: str) -> np.ndarray | None:
    """Each cell's total count over all genes from ``obs["n_counts"]`` (float64), checked.

    ``None`` when the column is absent: then a cell's total is its row sum in ``X``. The column
    is preferred because it was counted before any gene was filtered out.
    """
    if N_COUNTS not in obs:
        return None
    n_counts = pd.to_numeric(obs[N_COUNTS], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(n_counts) | (n_counts < 0) | ((n_counts == 0) & (np.diff(X.indptr) > 0))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{source}: obs column 'n_counts' is {obs[N_COUNTS].iloc[first]!r} for cell "
            f"{obs_names[first]!r} ({int(bad.sum())} such cells); it must be each cell's positive "
            "total UMI count: fix it or drop the column to use the row sums of X"
        )
    return n_counts


def var_gene_ids(var: pd.DataFrame) -> tuple[str, np.ndarray]:
    """The gene ids of the columns and the field they come from.

    ``var["ensembl_id"]`` when present (the readers fill it from symbols), else the var index.
    """
    if "ensembl_id" in var:
        return "var['ensembl_id']", var["ensembl_id"].astype(str).to_numpy()
    return "var_names", var.index.astype(str).to_numpy()


def check_cells(obs_names: pd.Index, path: Path | str) -> None:
    """A file must have cells, and unique cell ids (predictions and splits are joined by them)."""
    if len(obs_names) == 0:
        raise InputError(f"{path}: holds no cells (0 rows in obs); give a file with the cells to use")
    duplicated = obs_names.duplicated()
    if duplicated.any():
        first = obs_names[int(np.argmax(duplicated))]
        raise InputError(
            f"{path}: cell id {first!r} appears {int((obs_names == first).sum())} times in obs_names "
            f"({int(duplicated.sum())} repeats in all); make them unique (adata.obs_names_make_unique())"
        )


def check_gene_ids(ensembl_ids: np.ndarray, path: Path | str, field: str, fix: str) -> None:
    """Refuse a file none of whose genes has an id; report how many have none."""
    missing = int(np.sum(ensembl_ids == ""))
    if missing == len(ensembl_ids):
        raise InputError(f"{path}: every one of the {len(ensembl_ids)} genes has an empty Ensembl id in {field}; {fix}")
    if missing:
        log.warning("%d of %d genes have no Ensembl id in %s", missing, len(ensembl_ids), field)


def canonical_obs(columns: dict[str, np.ndarray], index: pd.Index, n_counts: np.ndarray,
                  extra: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """obs in canonical form: string columns as categoricals (as anndata stores them), n_counts int64."""
    obs = pd.DataFrame(index=pd.Index(index.astype(str), name=None))
    for name, values in {**columns, **(extra or {})}.items():
        obs[name] = pd.Categorical(np.asarray(values, dtype=object).astype(str))
    obs[N_COUNTS] = np.asarray(n_counts, dtype=np.int64)
    return obs


def canonical_var(symbols: Iterable[str], ensembl_ids: Iterable[str], index: Iterable[str]) -> pd.DataFrame:
    return pd.DataFrame({"symbol": list(symbols), "ensembl_id": list(ensembl_ids)},
                        index=pd.Index([str(name) for name in index], name=None))


# ---- writing ----


def write_canonical(path: str | os.PathLike[str], chunks: Iterable[sp.csr_matrix], n_genes: int,
                    obs: Any, var: pd.DataFrame) -> None:
    """Write the canonical AnnData to ``path`` from row chunks of counts (CSR int32, in cell order).

    ``obs`` is the obs frame, or a function of the cells' totals (``n_counts``, computed from the
    chunks as they pass) returning it, for readers that learn the totals only from the counts.
    Memory: one chunk at a time plus obs and var.
    """
    totals = []
    with h5py.File(path, "w") as handle:
        empty = sp.csr_matrix((0, n_genes), dtype=np.int32)
        empty.indptr = empty.indptr.astype(np.int64)  # no overflow past 2^31 non-zeros
        write_elem(handle, "X", empty)
        matrix = sparse_dataset(handle["X"])
        for chunk in chunks:
            totals.append(row_totals(chunk))
            matrix.append(chunk)
        frame = obs(np.concatenate(totals) if totals else np.zeros(0, np.int64)) if callable(obs) else obs
        write_elem(handle, "obs", frame)
        write_elem(handle, "var", var)
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(handle, name, {})
        handle.attrs["encoding-type"] = "anndata"
        handle.attrs["encoding-version"] = "0.1.0"


def read_canonical(path: str | os.PathLike[str]) -> ad.AnnData:
    return ad.read_h5ad(path)
