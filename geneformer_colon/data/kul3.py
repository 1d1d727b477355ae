"""The KUL3 cohort as GEO ships it (GSE144735): two gzipped text files, read into the canonical AnnData
and written from counts (the synthetic look-alike is written this way).

- ``GSE144735_processed_KUL3_CRC_10X_raw_UMI_count_matrix.txt.gz``: tab-separated, genes as
  rows, cells as columns; the header's first cell is ``Index``; row names are gene symbols.
- ``GSE144735_processed_KUL3_CRC_10X_annotation.txt.gz``: columns ``Index, Patient, Class,
  Sample, Cell_type, Cell_subtype``, one row a cell.

The matrix is parsed in blocks of gene rows by a compiled parser straight to sparse form,
never densely as a whole. Symbols become Ensembl ids through Geneformer's ``gene_name_id_dict``
(or a symbol/id TSV). Caching the result is the data source's job (``sources``).
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
import numpy as np
import pandas as pd
import scipy.sparse as sp

from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import atomic_path, open_text
from geneformer_colon.data.canonical import (
    OBS_COLUMNS,
    canonical_obs,
    canonical_var,
    count_problem,
    names_text,
    row_totals,
)
from geneformer_colon.data.dictionaries import read_gene_name_map
from geneformer_colon.data.kernels.geo_text import format_rows, parse_rows

logger = logging.getLogger(__name__)

# The cohort: files, annotation columns, and the names its annotation uses.
MATRIX_FILE = "GSE144735_processed_KUL3_CRC_10X_raw_UMI_count_matrix.txt.gz"
ANNOTATION_FILE = "GSE144735_processed_KUL3_CRC_10X_annotation.txt.gz"
ANNOTATION_COLUMNS = ("Index", "Patient", "Class", "Sample", "Cell_type", "Cell_subtype")
DONORS = ("KUL01", "KUL19", "KUL21", "KUL28", "KUL30", "KUL31")
CLASSES = ("Normal", "Border", "Tumor")
CELL_TYPES = ("B cells", "Epithelial cells", "Mast cells", "Myeloids", "Stromal cells", "T cells")

# annotation column -> canonical obs column
_KUL3_OBS = {"Patient": "donor", "Class": "label", "Cell_type": "cell_type", "Sample": "sample",
             "Cell_subtype": "cell_subtype"}
_READ_BYTES = 1 << 24  # decompressed bytes of the matrix parsed per block

GeneMap = str | os.PathLike[str] | Mapping[str, str]


def read_kul3(
    matrix_path: str | os.PathLike[str],
    annotation_path: str | os.PathLike[str],
    gene_map: GeneMap | None = None,
) -> ad.AnnData:
    """Read the GEO KUL3 count matrix and annotation into the canonical AnnData (in memory).

    ``gene_map`` (a path for :func:`read_gene_name_map` or a dict) gives ``var.ensembl_id``.
    """
    matrix_path, annotation_path = Path(matrix_path), Path(annotation_path)
    inputs = {matrix_path: "data.source.data_dir", annotation_path: "data.source.data_dir"}
    if gene_map is not None and not isinstance(gene_map, Mapping):
        inputs[Path(gene_map)] = "data.source.gene_map"
    for path, config in inputs.items():
        if not path.is_file():
            raise InputError(f"{path}: file not found; check {config}")
    cell_ids = _matrix_header(matrix_path)
    table = _kul3_obs(annotation_path, matrix_path, cell_ids)
    counts, symbols = _read_matrix(matrix_path, cell_ids)
    if gene_map is None:
        mapping, source = {}, "(no gene map given: set data.source.gene_map)"
    elif isinstance(gene_map, Mapping):
        mapping, source = dict(gene_map), "the given gene map"
    else:
        mapping, source = read_gene_name_map(gene_map), str(gene_map)
    ensembl_ids = [mapping.get(s, "") for s in symbols]
    unmapped = sum(1 for e in ensembl_ids if not e)
    if unmapped:
        logger.warning("%d of %d genes have no Ensembl id in %s", unmapped, len(ensembl_ids), source)
    obs = canonical_obs({name: table[name].to_numpy() for name in OBS_COLUMNS}, table.index, row_totals(counts),
                        extra={"cell_subtype": table["cell_subtype"].to_numpy()})
    return ad.AnnData(X=counts, obs=obs, var=canonical_var(symbols, ensembl_ids, symbols))


# ---------------------------------------------------------------- text parsing


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _matrix_header(path: Path) -> list[str]:
    try:
        with open_text(path) as handle:
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
    for column in ANNOTATION_COLUMNS:
        if column not in table.columns:
            raise InputError(
                f"{path}: annotation column '{column}' missing (columns: {names_text(table.columns)}); "
                f"the GEO KUL3 annotation has columns {', '.join(ANNOTATION_COLUMNS)}"
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
            pos, rows, nnz = parse_rows(buf, pos, n_cells, indices, data, row_nnz, spans)
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
    problem = count_problem(values)
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


# ---------------------------------------------------------------- text writing

_GENE_BLOCK = 256


def write_kul3(out_dir: str | os.PathLike[str], counts: sp.spmatrix, symbols: list[str], annotation: pd.DataFrame
               ) -> dict[str, Path]:
    """Write cells x genes counts and their annotation (columns ``ANNOTATION_COLUMNS``) as the two GEO files.

    Returns their paths under the keys ``matrix`` and ``annotation``.
    """
    out_dir = Path(out_dir)
    paths = {"matrix": out_dir / MATRIX_FILE, "annotation": out_dir / ANNOTATION_FILE}
    write_geo_matrix(paths["matrix"], counts, symbols, list(annotation["Index"]))
    with atomic_path(paths["annotation"]) as tmp:
        annotation.to_csv(tmp, sep="\t", index=False, compression={"method": "gzip", "compresslevel": 1})
    return paths


def write_geo_matrix(
    path: str | Path, counts: sp.spmatrix, symbols: list[str], cell_ids: list[str]
) -> None:
    """Write cells x genes counts as GEO's gzip text: genes as rows, cells as columns.

    Streamed in blocks of genes, each formatted by a compiled kernel and gzipped (level 1) on a
    thread pool as its own gzip member; a multi-member gzip file is a valid gzip stream.
    """
    by_gene = sp.csc_matrix(counts)
    by_gene.sort_indices()
    n_cells, n_genes = by_gene.shape
    names = [s.encode() for s in symbols]
    name_bytes = np.frombuffer(b"".join(names), np.uint8)
    name_offsets = np.concatenate([[0], np.cumsum([len(n) for n in names])]).astype(np.int64)
    header = ("Index\t" + "\t".join(cell_ids) + "\n").encode()

    def block(g0: int) -> bytes:
        g1 = min(g0 + _GENE_BLOCK, n_genes)
        nnz = by_gene.indptr[g1] - by_gene.indptr[g0]
        # symbols + a tab and "0" per cell + newline per row + at most 10 digits per non-zero
        size = name_offsets[g1] - name_offsets[g0] + (g1 - g0) * (2 * n_cells + 1) + 10 * nnz
        out = np.empty(size, np.uint8)
        used = format_rows(
            by_gene.indptr, by_gene.indices, by_gene.data, g0, g1, n_cells, name_bytes,
            name_offsets, out,
        )
        return gzip.compress(out[:used].tobytes(), compresslevel=1)

    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        handle.write(gzip.compress(header, compresslevel=1))
        with ThreadPoolExecutor(max_workers=2) as pool:
            # In order; at most the gzipped blocks wait (the file is ~6% of its text).
            for chunk in pool.map(block, range(0, n_genes, _GENE_BLOCK)):
                handle.write(chunk)
