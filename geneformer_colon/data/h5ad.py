"""Any ``.h5ad`` of raw counts, read from disk in row chunks, into the canonical AnnData.

The counts (``X`` or a layer) are never loaded whole: :class:`H5adReader` reads row ranges
(a CSR matrix or a dense array on disk; a CSC matrix has to be read whole to give rows), so
memory is bounded by a chunk plus the per-cell and per-gene metadata.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset

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
    write_canonical,
)
from geneformer_colon.errors import InputError

CHUNK_CELLS = 10_000


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

    def count_chunks(self, fix: str, chunk_cells: int = CHUNK_CELLS) -> Iterator[sp.csr_matrix]:
        """The counts as checked canonical CSR int32 chunks of ``chunk_cells`` cells, in cell order."""
        n_cells = self.shape[0]
        for start in range(0, n_cells, chunk_cells):
            stop = min(start + chunk_cells, n_cells)
            yield count_csr(self.rows(start, stop), f"{self.path}: {self.where}", self.obs.index[start:stop],
                            self.var.index, fix)

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


def h5ad_to_canonical(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    donor_key: str = "donor",
    label_key: str = "label",
    cell_type_key: str | None = "cell_type",
    sample_key: str | None = None,
    ensembl_key: str | None = "ensembl_id",
    layer: str | None = None,
    chunk_cells: int = CHUNK_CELLS,
) -> None:
    """Write the canonical AnnData of any h5ad of raw counts to ``out``, a chunk of cells at a time.

    Counts come from ``X`` or ``layers[layer]`` and must be non-negative integers (stored as any
    dtype). Without ``sample_key`` the sample is ``{donor}-{label}`` (KUL3's one sample per donor
    and region); without ``cell_type_key`` every cell's type is "unknown".
    """
    with H5adReader(path, layer) as source:
        keys = {"donor": (donor_key, "data.source.donor_key", "the donor column"),
                "label": (label_key, "data.source.label_key", "the Normal/Border/Tumor label column")}
        if cell_type_key is not None:
            keys["cell_type"] = (cell_type_key, "data.source.cell_type_key", "the cell-type column (or null)")
        if sample_key is not None:
            keys["sample"] = (sample_key, "data.source.sample_key", "the sample column (or null)")
        columns = {name: obs_strings(source.obs, key, source.path, setting, what)
                   for name, (key, setting, what) in keys.items()}
        columns.setdefault("cell_type", np.full(len(source.obs), UNKNOWN_CELL_TYPE, dtype=object))
        columns.setdefault("sample", columns["donor"] + "-" + columns["label"])
        genes = source.var.index.astype(str)
        ensembl_ids = ensembl_ids_of(source.var, ensembl_key, source.path, "data.source.ensembl_key")
        check_gene_ids(ensembl_ids, source.path, f"var['{ensembl_key}']" if ensembl_key else "the var index",
                       "set data.source.ensembl_key to the var column of Ensembl ids (or null for the var index)")
        fix = "set data.source.layer to the layer of raw counts"
        write_canonical(
            out,
            source.count_chunks(fix, chunk_cells),
            len(genes),
            lambda n_counts: canonical_obs({name: columns[name] for name in OBS_COLUMNS}, source.obs.index, n_counts),
            canonical_var(genes, ensembl_ids, genes),
        )
