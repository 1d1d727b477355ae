"""Any ``.h5ad`` of raw counts read in place, in row chunks, as canonical cells.

The counts (``X`` or a layer) are never loaded whole: :class:`H5adReader` reads row ranges
(a CSR matrix or a dense array on disk; a CSC matrix has to be read whole to give rows), so
memory is bounded by a chunk plus the per-cell and per-gene metadata; :class:`CanonicalCells`
gives the cells of a user's file or of a canonical file in canonical form (``canonical``)
without writing a copy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset

from geneformer_colon.common.errors import InputError
from geneformer_colon.data.canonical import (
    OBS_COLUMNS,
    UNKNOWN_CELL_TYPE,
    canonical_obs,
    canonical_var,
    check_cells,
    check_gene_ids,
    count_csr,
    names_text,
    obs_strings,
    row_totals,
    var_gene_ids,
)
from geneformer_colon.data.counts import CHUNK_CELLS, CellCounts, Chunk


class H5adReader:
    """An h5ad file opened read-only: its obs, var and counts in row chunks.

    ``layer``: counts from ``layers[layer]`` instead of ``X``. Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike[str], layer: str | None = None, layer_setting: str = "data.source.layer"
                 ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: file not found; give the path of an .h5ad file")
        try:
            self.handle = h5py.File(self.path, "r")
            self.obs: pd.DataFrame = read_elem(self.handle["obs"])
            self.var: pd.DataFrame = read_elem(self.handle["var"])
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise InputError(f"{self.path}: not a readable .h5ad ({error})") from None
        self.where = "X" if layer is None else f"layers['{layer}']"
        if layer is None:
            element = self.handle.get("X")
            if element is None:
                self.close()
                raise InputError(f"{self.path}: X is empty; set {layer_setting} to the layer of raw counts")
        else:
            layers = self.handle.get("layers", {})
            if layer not in layers:
                names = names_text(layers.keys())
                self.close()
                raise InputError(f"{self.path}: layer '{layer}' missing (layers: {names}); set {layer_setting} "
                                 "to the layer of raw counts")
            element = layers[layer]
        self.matrix = self._rows_reader(element)
        check_cells(self.obs.index, self.path)

    def _rows_reader(self, element: Any) -> Any:
        encoding = element.attrs.get("encoding-type", "array") if hasattr(element, "attrs") else "array"
        if encoding in ("csr_matrix", "csc_matrix"):
            return sparse_dataset(element)
        if isinstance(element, h5py.Dataset):
            return element
        raise InputError(f"{self.path}: {self.where} is stored as {encoding!r}; expected a sparse or dense matrix")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)

    def rows(self, start: int, stop: int) -> Any:
        """Cells ``start:stop`` of the counts, as stored (sparse or dense); not yet checked."""
        return self.matrix[start:stop]

    def count_rows(self, start: int, stop: int, fix: str) -> sp.csr_matrix:
        """Cells ``start:stop`` of the counts as checked canonical CSR int32 (``fix`` goes into the error)."""
        return count_csr(self.rows(start, stop), f"{self.path}: {self.where}", self.obs.index[start:stop],
                         self.var.index, fix)

    def count_chunks(self, fix: str, chunk_cells: int = CHUNK_CELLS) -> Iterator[sp.csr_matrix]:
        """The counts as checked canonical CSR int32 chunks of ``chunk_cells`` cells, in cell order."""
        n_cells = self.shape[0]
        for start in range(0, n_cells, chunk_cells):
            yield self.count_rows(start, min(start + chunk_cells, n_cells), fix)

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> H5adReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ensembl_ids_of(var: pd.DataFrame, ensembl_key: str | None, path: Path, setting: str) -> np.ndarray:
    """The Ensembl ids of the genes: a var column, or the var index (``ensembl_key=None``)."""
    if ensembl_key is None:
        return var.index.astype(str).to_numpy()
    if ensembl_key not in var.columns:
        raise InputError(
            f"{path}: var column '{ensembl_key}' missing (columns: {names_text(var.columns)}); set {setting} to the "
            "var column of Ensembl ids, or null when the var index holds them"
        )
    column = var[ensembl_key]
    return column.astype(object).where(column.notna(), "").astype(str).to_numpy()


@dataclass(frozen=True)
class H5adKeys:
    """Where an h5ad keeps the canonical fields: obs columns, the var column of Ensembl ids, the layer of counts.

    ``None``: no cell types (all "unknown"), no sample (``{donor}-{label}``, KUL3's one sample per
    donor and region), Ensembl ids in the var index, counts in ``X``. The defaults are the
    ``data=h5ad`` config's; :data:`CANONICAL_KEYS` are a canonical file's own.
    """

    donor_key: str = "donor"
    label_key: str = "label"
    cell_type_key: str | None = "cell_type"
    sample_key: str | None = None
    ensembl_key: str | None = "ensembl_id"
    layer: str | None = None


CANONICAL_KEYS = H5adKeys(sample_key="sample")
_FIX_COUNTS = "set data.source.layer to the layer of raw counts"


class CanonicalCells:
    """Cells in canonical form (see ``canonical``), read from an h5ad where it lies, a chunk of cells at a time.

    The h5ad is a user's file of raw counts read through its ``keys`` (obs columns renamed, Ensembl
    ids from a var column, every chunk of counts checked as it is read: nothing is copied), or a
    canonical file a source wrote and checked (``checked``: read as it is). ``source`` names the
    user's input in errors; ``identity`` names the content in cache keys (the token store's, the
    derived dictionaries'). obs and var are read on first use.
    """

    def __init__(self, path: str | os.PathLike[str], source: str, identity: str, keys: H5adKeys = CANONICAL_KEYS,
                 checked: bool = False) -> None:
        self.path, self.source, self.identity, self.keys, self.checked = Path(path), source, identity, keys, checked

    def _open(self) -> H5adReader:
        return H5adReader(self.path, self.keys.layer)

    @cached_property
    def obs(self) -> pd.DataFrame:
        """The canonical obs columns but ``n_counts`` (donor, label, cell_type, sample: strings), indexed by cell id."""
        with self._open() as file:
            obs = file.obs
        keys = self.keys
        named = {"donor": (keys.donor_key, "data.source.donor_key", "the donor column"),
                 "label": (keys.label_key, "data.source.label_key", "the Normal/Border/Tumor label column")}
        if keys.cell_type_key is not None:
            named["cell_type"] = (keys.cell_type_key, "data.source.cell_type_key", "the cell-type column (or null)")
        if keys.sample_key is not None:
            named["sample"] = (keys.sample_key, "data.source.sample_key", "the sample column (or null)")
        columns = {name: obs_strings(obs, key, self.path, setting, what)
                   for name, (key, setting, what) in named.items()}
        columns.setdefault("cell_type", np.full(len(obs), UNKNOWN_CELL_TYPE, dtype=object))
        columns.setdefault("sample", columns["donor"] + "-" + columns["label"])
        return pd.DataFrame({name: columns[name] for name in OBS_COLUMNS}, index=obs.index.astype(str).rename(None))

    @cached_property
    def var(self) -> pd.DataFrame:
        """The canonical var: ``symbol`` (the var index) and ``ensembl_id`` ("" where none), checked."""
        with self._open() as file:
            var = file.var
        if self.checked:
            return var
        symbols = var.index.astype(str)
        ensembl_ids = ensembl_ids_of(var, self.keys.ensembl_key, self.path, "data.source.ensembl_key")
        field = f"var['{self.keys.ensembl_key}']" if self.keys.ensembl_key else "the var index"
        check_gene_ids(ensembl_ids, self.path, field,
                       "set data.source.ensembl_key to the var column of Ensembl ids (or null for the var index)")
        return canonical_var(symbols, ensembl_ids, symbols)

    def counts(self, rows: np.ndarray | None = None, chunk_cells: int = CHUNK_CELLS) -> CellCounts:
        """The counts (CSR int32) of all cells, or of those at the sorted positions ``rows``, and their totals.

        A cell's total (``n_counts``) is its row sum over all genes, as the canonical file records it.
        """
        n_cells = len(self.obs)
        field, gene_ids = var_gene_ids(self.var)
        selected = np.arange(n_cells) if rows is None else np.asarray(rows, dtype=np.int64)

        def chunks() -> Iterator[Chunk]:
            with self._open() as file:
                for low in range(0, n_cells, chunk_cells):
                    high = min(low + chunk_cells, n_cells)
                    wanted = selected[np.searchsorted(selected, low) : np.searchsorted(selected, high)]
                    if len(wanted) == 0:
                        continue
                    block = sp.csr_matrix(file.rows(low, high)) if self.checked \
                        else file.count_rows(low, high, _FIX_COUNTS)
                    if len(wanted) != high - low:
                        block = block[wanted - low]
                    yield block, row_totals(block).astype(np.float64)

        return CellCounts(chunks, gene_ids, field, len(selected), self.source)

    def to_anndata(self, chunk_cells: int = CHUNK_CELLS) -> ad.AnnData:
        """The canonical AnnData in memory (every cell's counts: for what needs them all at once)."""
        counts = [block for block, _ in self.counts(chunk_cells=chunk_cells).chunks()]
        X = sp.vstack(counts, format="csr") if counts else sp.csr_matrix((0, len(self.var)), dtype=np.int32)
        return ad.AnnData(X=X, obs=canonical_obs(dict(self.obs.items()), self.obs.index, row_totals(X)), var=self.var)
