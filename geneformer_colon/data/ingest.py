"""Ingest: GEO KUL3 text files or any .h5ad into the canonical AnnData.

Canonical AnnData (what everything downstream consumes):

- ``X``: CSR int32 raw UMI counts, cells x genes;
- ``obs`` (index: cell id): ``donor``, ``label``, ``cell_type``, ``sample`` (str) and
  ``n_counts`` (int64 total counts of the cell over all genes); KUL3 adds ``cell_subtype``;
- ``var`` (index: gene symbol, or the h5ad's own var index): ``symbol`` and ``ensembl_id``
  (str, "" where the gene has no Ensembl id).
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO

import anndata as ad
import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from geneformer_colon.data.dictionaries import load_pickle_dict
from geneformer_colon.errors import InputError

logger = logging.getLogger(__name__)

KUL3_ANNOTATION_COLUMNS = ("Index", "Patient", "Class", "Sample", "Cell_type", "Cell_subtype")
# annotation column -> obs column, in obs order
_KUL3_OBS = {
    "Patient": "donor",
    "Class": "label",
    "Cell_type": "cell_type",
    "Sample": "sample",
    "Cell_subtype": "cell_subtype",
}
_READ_BYTES = 1 << 24  # decompressed bytes of the matrix parsed per block
_INT32_MAX = np.iinfo(np.int32).max

GeneMap = str | os.PathLike[str] | Mapping[str, str]


def read_gene_name_map(path: str | os.PathLike[str]) -> dict[str, str]:
    """Gene symbol -> Ensembl id, from a Geneformer ``gene_name_id_dict*.pkl`` or a TSV.

    The TSV has two tab-separated columns, symbol then Ensembl id (optionally gzipped). Its
    first row is taken as a header when its id does not start with ``ENS``; rows with an empty
    id are skipped.
    """
    path = Path(path)
    if path.suffix in {".pkl", ".pickle"}:
        mapping = load_pickle_dict(path)
        bad = next(((k, v) for k, v in mapping.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise InputError(
                f"{path}: maps {bad[0]!r} to {type(bad[1]).__name__} {bad[1]!r}, not to an Ensembl "
                "id; the gene map must be a gene_name_id_dict*.pkl (symbol -> Ensembl id)"
            )
        return {str(k): v for k, v in mapping.items()}
    if not path.is_file():
        raise InputError(
            f"{path}: gene map not found; set data.source.gene_map to a symbol/id TSV or pkl"
        )
    mapping: dict[str, str] = {}
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != 2:
                raise InputError(
                    f"{path}: line {number} has {len(fields)} tab-separated fields, expected 2 "
                    "(gene symbol, Ensembl id)"
                )
            symbol, gene_id = fields
            if number == 1 and not gene_id.startswith("ENS"):
                continue  # header
            if not gene_id:
                continue
            if mapping.setdefault(symbol, gene_id) != gene_id:
                raise InputError(
                    f"{path}: line {number}: symbol {symbol!r} maps to both {mapping[symbol]!r} "
                    f"and {gene_id!r}; keep one row per symbol"
                )
    return mapping


def read_kul3(
    matrix_path: str | os.PathLike[str],
    annotation_path: str | os.PathLike[str],
    gene_map: GeneMap | None = None,
) -> ad.AnnData:
    """Read the GEO KUL3 count matrix and annotation into the canonical AnnData.

    The matrix (genes as rows, cells as columns, header ``Index`` then cell ids) is parsed in
    blocks of gene rows, never densely as a whole. ``gene_map`` (a path for
    :func:`read_gene_name_map` or a dict) gives ``var.ensembl_id``. Caching the result is the
    data source's job (:mod:`geneformer_colon.data.sources`).
    """
    matrix_path, annotation_path = Path(matrix_path), Path(annotation_path)
    inputs = {matrix_path: "data.source.data_dir", annotation_path: "data.source.data_dir"}
    if gene_map is not None and not isinstance(gene_map, Mapping):
        inputs[Path(gene_map)] = "data.source.gene_map"
    for path, config in inputs.items():
        if not path.is_file():
            raise InputError(f"{path}: file not found; check {config}")
    cell_ids = _matrix_header(matrix_path)
    obs = _kul3_obs(annotation_path, matrix_path, cell_ids)
    counts, symbols = _read_matrix(matrix_path, cell_ids)
    obs["n_counts"] = _row_totals(counts)
    if gene_map is None:
        mapping, source = {}, "(no gene map given: set data.source.gene_map)"
    elif isinstance(gene_map, Mapping):
        mapping, source = dict(gene_map), "the given gene map"
    else:
        mapping, source = read_gene_name_map(gene_map), str(gene_map)
    ensembl_ids = [mapping.get(s, "") for s in symbols]
    _log_unmapped(ensembl_ids, source)
    return ad.AnnData(
        X=counts,
        obs=obs,
        var=pd.DataFrame({"symbol": symbols, "ensembl_id": ensembl_ids}, index=symbols),
    )


def read_h5ad(
    path: str | os.PathLike[str],
    donor_key: str = "donor",
    label_key: str = "label",
    cell_type_key: str = "cell_type",
    sample_key: str | None = None,
    ensembl_key: str | None = "ensembl_id",
    layer: str | None = None,
) -> ad.AnnData:
    """Any .h5ad to the canonical AnnData.

    Counts come from ``X`` or ``layers[layer]`` and must be non-negative integers (stored as
    any dtype). Without ``sample_key`` the sample is ``{donor}-{label}`` (KUL3's one sample per
    donor and region). ``ensembl_key=None`` takes the Ensembl ids from the var index.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; set data.source.path")
    try:
        source = ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as err:
        raise InputError(f"{path}: not a readable .h5ad ({err})") from err
    obs_keys = {
        "donor": (donor_key, "data.source.donor_key", "the donor column"),
        "label": (label_key, "data.source.label_key", "the Normal/Border/Tumor label column"),
        "cell_type": (cell_type_key, "data.source.cell_type_key", "the cell-type column"),
    }
    if sample_key is not None:
        obs_keys["sample"] = (sample_key, "data.source.sample_key", "the sample column (or null)")
    obs = pd.DataFrame(index=source.obs_names.astype(str))
    for name, (key, config, what) in obs_keys.items():
        obs[name] = _obs_strings(source.obs, key, path, config, what)
    if sample_key is None:
        obs["sample"] = obs["donor"] + "-" + obs["label"]

    if layer is None:
        matrix, where = source.X, "X"
    elif layer in source.layers:
        matrix, where = source.layers[layer], f"layers['{layer}']"
    else:
        raise InputError(
            f"{path}: layer '{layer}' missing (layers: {_names(source.layers.keys())}); set "
            "data.source.layer to the layer of raw counts, or null to use X"
        )
    if matrix is None:
        raise InputError(f"{path}: X is empty; set data.source.layer to the layer of raw counts")
    genes = source.var_names.astype(str)
    if ensembl_key is None:
        ensembl_ids = list(genes)
    elif ensembl_key in source.var.columns:
        column = source.var[ensembl_key]
        ensembl_ids = list(column.astype(object).where(column.notna(), "").astype(str))
    else:
        raise InputError(
            f"{path}: var column '{ensembl_key}' missing (columns: {_names(source.var.columns)}); "
            "set data.source.ensembl_key to the var column of Ensembl ids, or null when the var "
            "index holds them"
        )
    counts = _count_csr(matrix, f"{path}: {where}", source.obs_names, source.var_names)
    obs["n_counts"] = _row_totals(counts)
    _log_unmapped(ensembl_ids, f"{path} var['{ensembl_key}']")
    var = pd.DataFrame({"symbol": list(genes), "ensembl_id": ensembl_ids}, index=genes)
    return ad.AnnData(X=counts, obs=obs, var=var)


# ---------------------------------------------------------------- KUL3 text


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="")
    return path.open("r", newline="")


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _matrix_header(path: Path) -> list[str]:
    try:
        with _open_text(path) as handle:
            header = handle.readline().rstrip("\r\n").split("\t")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: unreadable count matrix ({err})") from err
    cell_ids = header[1:]
    if not cell_ids:
        raise InputError(
            f"{path}: header has no cell ids; expected a tab-separated header 'Index' then one "
            "cell id per column (genes as rows)"
        )
    duplicated = pd.Index(cell_ids).duplicated()
    if duplicated.any():
        raise InputError(
            f"{path}: header repeats cell id '{cell_ids[int(np.argmax(duplicated))]}'; "
            "cell ids must be unique"
        )
    return cell_ids


def _kul3_obs(path: Path, matrix_path: Path, cell_ids: list[str]) -> pd.DataFrame:
    """The annotation rows of the matrix's cells, in matrix order, as obs columns."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: unreadable annotation table ({err})") from err
    for column in KUL3_ANNOTATION_COLUMNS:
        if column not in table.columns:
            raise InputError(
                f"{path}: annotation column '{column}' missing (columns: {_names(table.columns)}); "
                f"the GEO KUL3 annotation has columns {', '.join(KUL3_ANNOTATION_COLUMNS)}"
            )
    duplicated = table["Index"].duplicated()
    if duplicated.any():
        raise InputError(
            f"{path}: Index '{table['Index'][duplicated].iloc[0]}' appears more than once; "
            "keep one annotation row per cell"
        )
    table = table.set_index("Index")
    present = pd.Index(cell_ids).isin(table.index)
    if not present.all():
        missing = [c for c, p in zip(cell_ids, present) if not p]
        raise InputError(
            f"{matrix_path}: {len(missing)} of {len(cell_ids)} cells have no row in {path} "
            f"(e.g. '{missing[0]}'); the annotation's Index column must list every matrix cell id"
        )
    unused = len(table) - len(cell_ids)
    if unused:
        logger.warning(
            "%s: %d annotation rows have no column in %s; dropped", path, unused, matrix_path
        )
    table = table.loc[cell_ids, list(_KUL3_OBS)].rename(columns=_KUL3_OBS)
    table.index.name = None
    return table


def _read_matrix(path: Path, cell_ids: list[str]) -> tuple[sp.csr_matrix, list[str]]:
    """Parse the genes x cells text in blocks of whole lines; return CSR cells x genes, symbols.

    Plain integer rows go through a compiled parser straight to sparse form (no dense block);
    a row it cannot take (floats like ``1.0``, CRLF, bad values) is parsed or reported by
    :func:`_parse_line`.
    """
    n_cells = len(cell_ids)
    symbols: list[str] = []
    row_parts, index_parts, data_parts = [], [], []
    for block in _line_blocks(path):
        buf = np.frombuffer(block, np.uint8)
        indices = np.empty(buf.size // 2 + 1, np.int32)
        data = np.empty_like(indices)
        spans = np.empty((buf.size // (2 * n_cells) + 1, 2), np.int64)
        row_nnz = np.empty(spans.shape[0], np.int64)
        pos = 0
        while pos < buf.size:
            pos, rows, nnz = _parse_rows(buf, pos, n_cells, indices, data, row_nnz, spans)
            symbols.extend(block[a:b].decode(errors="replace") for a, b in spans[:rows])
            row_parts.append(row_nnz[:rows].copy())
            index_parts.append(indices[:nnz].copy())
            data_parts.append(data[:nnz].copy())
            if pos < buf.size:  # a line the compiled parser leaves to Python
                stop = block.find(b"\n", pos) + 1 or buf.size
                parsed = _parse_line(block[pos:stop], path, cell_ids, len(symbols) + 2)
                if parsed is not None:
                    symbols.append(parsed[0])
                    row_parts.append(np.array([parsed[1].size]))
                    index_parts.append(parsed[1])
                    data_parts.append(parsed[2])
                pos = stop
    if not symbols:
        raise InputError(f"{path}: no gene rows below the header")
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(row_parts))])
    data, indices = np.concatenate(data_parts), np.concatenate(index_parts)
    del data_parts, index_parts
    # Genes x cells CSR arrays are the cells x genes CSC layout.
    by_gene = sp.csc_matrix((data, indices, indptr), shape=(n_cells, len(symbols)))
    del data, indices
    return by_gene.tocsr(), symbols


def _line_blocks(path: Path) -> Iterator[bytes]:
    """The matrix below its header in blocks of whole lines, decompressed one block ahead."""
    with _open_binary(path) as handle, ThreadPoolExecutor(max_workers=1) as pool:
        handle.readline()  # the header, read by _matrix_header
        rest = b""
        pending = pool.submit(handle.read, _READ_BYTES)
        while chunk := _result(pending, path):
            pending = pool.submit(handle.read, _READ_BYTES)
            buf = rest + chunk
            end = buf.rfind(b"\n") + 1
            rest = buf[end:]
            if end:
                yield buf[:end]
        if rest:
            yield rest


def _result(read: Future[bytes], path: Path) -> bytes:
    try:
        return read.result()
    except (OSError, EOFError, zlib.error) as err:
        raise InputError(
            f"{path}: cannot read the count matrix ({err}); the file may be truncated: "
            "download it again"
        ) from err


def _parse_line(
    line: bytes, path: Path, cell_ids: list[str], line_number: int
) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(symbol, cell indices, counts) of one gene row; None for a blank line; else InputError."""
    text = line.decode(errors="replace").rstrip("\r\n")
    if not text.strip():
        return None
    symbol, *fields = text.split("\t")
    if len(fields) != len(cell_ids):
        raise InputError(
            f"{path}: gene row '{symbol}' (line {line_number}) has {len(fields)} counts but the "
            f"header names {len(cell_ids)} cells; every row needs one count per cell"
        )
    values = np.asarray(fields, dtype=object)
    problem = _count_problem(values)
    if problem is not None:
        flat, what = problem
        raise InputError(
            f"{path}: gene row '{symbol}' (line {line_number}) has a {what} count "
            f"{values[flat]!r} for cell '{cell_ids[flat]}'; the matrix must hold raw UMI counts "
            "(non-negative integers)"
        )
    counts = pd.to_numeric(values).astype(np.int32)
    cells = np.flatnonzero(counts).astype(np.int32)
    return symbol, cells, counts[cells]


@numba.njit(nogil=True, cache=True)
def _parse_rows(buf, pos, n_cells, indices, data, row_nnz, spans):  # pragma: no cover - compiled
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


# ---------------------------------------------------------------- shared


def _count_problem(values: np.ndarray) -> tuple[int, str] | None:
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


def _count_csr(matrix, where: str, obs_names: pd.Index, var_names: pd.Index) -> sp.csr_matrix:
    """An h5ad count matrix (dense or sparse) as CSR int32, after checking it holds counts."""
    if sp.issparse(matrix):
        csr = sp.csr_matrix(matrix)
        csr.sum_duplicates()
        problem = _count_problem(csr.data)
        if problem is not None:
            flat = problem[0]
            row, col = int(np.searchsorted(csr.indptr, flat, side="right")) - 1, csr.indices[flat]
            value = csr.data[flat]
    else:
        dense = np.asarray(matrix)
        problem = _count_problem(dense)
        if problem is not None:
            row, col = divmod(problem[0], dense.shape[1])
            value = dense.flat[problem[0]]
        csr = sp.csr_matrix(dense)
    if problem is not None:
        raise InputError(
            f"{where} holds a {problem[1]} value {_show(value)} (cell '{obs_names[row]}', gene "
            f"'{var_names[col]}'); it must hold raw UMI counts: set data.source.layer to the "
            "layer of raw counts"
        )
    csr = sp.csr_matrix((csr.data.astype(np.int32), csr.indices, csr.indptr), shape=csr.shape)
    csr.eliminate_zeros()
    csr.sort_indices()
    return csr


def _row_totals(counts: sp.csr_matrix) -> np.ndarray:
    return np.asarray(counts.sum(axis=1, dtype=np.int64)).ravel()


def _obs_strings(obs: pd.DataFrame, key: str, path: Path, config: str, what: str) -> np.ndarray:
    if key not in obs.columns:
        raise InputError(
            f"{path}: obs column '{key}' missing (columns: {_names(obs.columns)}); set {config} "
            f"to {what}"
        )
    column = obs[key]
    if column.isna().any():
        raise InputError(
            f"{path}: obs column '{key}' is empty for {int(column.isna().sum())} cells "
            f"(e.g. '{obs.index[column.isna().to_numpy()][0]}'); fill it or drop those cells"
        )
    return column.astype(str).to_numpy(dtype=object)


def _log_unmapped(ensembl_ids: list[str], source: str) -> None:
    unmapped = sum(1 for e in ensembl_ids if not e)
    if unmapped:
        logger.warning(
            "%d of %d genes have no Ensembl id in %s", unmapped, len(ensembl_ids), source
        )


def _show(value: object) -> str:
    return repr(value.item() if isinstance(value, np.generic) else value)


def _names(names) -> str:
    names = [str(n) for n in names]
    return ", ".join(names) if names else "none"
