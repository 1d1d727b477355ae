"""Geneformer's gene dictionaries: safe loading of the released pickles, or deriving them.

A token dictionary maps gene ids (Ensembl) to token ids, the gene median dictionary maps
them to the gene's non-zero median expression (the rank-value encoding's normaliser), and an
optional mapping dictionary collapses ids onto one another (Geneformer V2's
``ensembl_mapping_dict``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from geneformer_colon.errors import InputError
from geneformer_colon.io import atomic_path

LFS_POINTER_PREFIX = b"version https://git-lfs"

# What a Geneformer dictionary pickle may contain: dicts of str to int/float (numpy scalars).
_ALLOWED_GLOBALS = {
    ("builtins", "dict"),
    ("builtins", "str"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_pickle_dict(path: str | Path) -> dict[Any, Any]:
    """Load a Geneformer dictionary pickle without executing arbitrary code.

    Only dicts of strings to ints, floats and numpy scalars are accepted; a Git LFS pointer
    file (the dictionaries were cloned without ``git lfs pull``) gets a clear error.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: dictionary file not found; check the path in the model config")
    with path.open("rb") as handle:
        head = handle.read(len(LFS_POINTER_PREFIX))
        if head == LFS_POINTER_PREFIX:
            raise InputError(
                f"{path}: is a Git LFS pointer, not the dictionary; run `git lfs pull` in the "
                "Geneformer checkout (or download the file itself) and point the config at it"
            )
        handle.seek(0)
        try:
            loaded = _RestrictedUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
            raise InputError(
                f"{path}: not a Geneformer dictionary pickle ({err}); expected a dict of gene ids "
                "to token ids or medians"
            ) from err
    if not isinstance(loaded, Mapping):
        raise InputError(f"{path}: holds a {type(loaded).__name__}, expected a dict of gene ids")
    return dict(loaded)


# ---- the canonical AnnData, as the dictionaries and the tokenizer read it ----

TARGET_SUM = 10_000
SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "V1": ("<pad>", "<mask>"),
    "V2": ("<pad>", "<mask>", "<cls>", "<eos>"),
}


def check_model_version(model_version: str) -> str:
    if model_version not in SPECIAL_TOKENS:
        raise InputError(
            f"model_version {model_version!r} is unknown; use one of {', '.join(SPECIAL_TOKENS)} "
            "(V1 with the *_gc30M dictionaries, V2 with the *_gc104M dictionaries)"
        )
    return model_version


def special_token_ids(token_dict: Mapping[str, int], model_version: str) -> dict[str, int]:
    """The special tokens of ``model_version`` and their ids in ``token_dict``."""
    names = SPECIAL_TOKENS[check_model_version(model_version)]
    missing = [name for name in names if name not in token_dict]
    if missing:
        raise InputError(
            f"token dictionary lacks {missing}, needed by model_version {model_version}; use the token "
            "dictionary of that model version (*_gc30M for V1, *_gc104M for V2)"
        )
    return {name: int(token_dict[name]) for name in names}


def var_gene_ids(adata: ad.AnnData) -> tuple[str, np.ndarray]:
    """The gene ids of ``adata``'s columns and the field they come from.

    ``var["ensembl_id"]`` when present (ingest fills it from symbols), else the var index.
    """
    if "ensembl_id" in adata.var:
        return "var['ensembl_id']", adata.var["ensembl_id"].astype(str).to_numpy()
    return "var_names", adata.var_names.astype(str).to_numpy()


def check_raw_counts(data: np.ndarray, source: str) -> None:
    """Refuse anything but raw integer UMI counts (the non-zeros of the expression matrix)."""
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


def obs_n_counts(adata: ad.AnnData, X: sp.csr_matrix, source: str) -> np.ndarray | None:
    """Each cell's total count over all genes from ``obs["n_counts"]`` (float64), checked.

    ``None`` when the column is absent: then a cell's total is its row sum in ``X``. The column
    is preferred because it was counted before any gene was filtered out.
    """
    if "n_counts" not in adata.obs:
        return None
    n_counts = pd.to_numeric(adata.obs["n_counts"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(n_counts) | (n_counts < 0) | ((n_counts == 0) & (np.diff(X.indptr) > 0))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{source}: obs column 'n_counts' is {adata.obs['n_counts'].iloc[first]!r} for cell "
            f"{adata.obs_names[first]!r} ({int(bad.sum())} such cells); it must be each cell's positive "
            "total UMI count: fix it or drop the column to use the row sums of X"
        )
    return n_counts


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


# ---- the dictionaries ----

DictSource = str | os.PathLike[str] | Mapping[str, Any]


def as_dict(source: DictSource) -> dict[str, Any]:
    """A dictionary given as a pickle path (loaded safely) or as an already-loaded mapping."""
    if isinstance(source, Mapping):
        return dict(source)
    return load_pickle_dict(source)


def _checked(
    source: DictSource, what: str, valid: Callable[[Any], bool], convert: Callable[[Any], Any], expected: str
) -> dict[str, Any]:
    """``source`` loaded, every value checked with ``valid`` and normalised with ``convert``."""
    content = as_dict(source)
    for key, value in content.items():
        if not valid(value):
            name = what if isinstance(source, Mapping) else str(source)
            raise InputError(
                f"{name}: entry {key!r} is {value!r}, expected {expected}; is this the {what} "
                "of the model version in use?"
            )
    return {str(key): convert(value) for key, value in content.items()}


def _is_token_id(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


def _is_median(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class GeneDictionaries:
    """Token ids, gene medians and (optionally) the id-collapsing map of one model version."""

    token: dict[str, int]
    median: dict[str, float]
    mapping: dict[str, str] | None = None

    @classmethod
    def load(
        cls, token: DictSource, median: DictSource, mapping: DictSource | None = None
    ) -> GeneDictionaries:
        """Load (paths) or adopt (dicts) the dictionaries, as plain str -> int / float / str."""
        return cls(
            _checked(token, "token dictionary", _is_token_id, int, "a non-negative integer token id"),
            _checked(median, "gene median dictionary", _is_median, float, "a positive finite median"),
            None
            if mapping is None
            else _checked(mapping, "gene mapping dictionary", lambda value: isinstance(value, str), str, "a gene id"),
        )

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the dictionaries as plain pickles, named as Geneformer names them."""
        directory = Path(directory)
        files = {"token_dictionary.pkl": self.token, "gene_median_dictionary.pkl": self.median}
        if self.mapping is not None:
            files["ensembl_mapping_dict.pkl"] = self.mapping
        for name, content in files.items():
            with atomic_path(directory / name) as tmp:
                tmp.write_bytes(pickle.dumps(dict(content), protocol=pickle.HIGHEST_PROTOCOL))

    def fingerprint(self) -> str:
        """A stable sha256 of the contents (independent of insertion order)."""
        payload = [
            sorted(self.token.items()),
            sorted(self.median.items()),
            None if self.mapping is None else sorted(self.mapping.items()),
        ]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def derive_dictionaries(adata: ad.AnnData, model_version: str = "V1") -> GeneDictionaries:
    """A vocabulary and gene medians from ``adata`` itself, for a model trained from scratch.

    The vocabulary is every gene id (``var["ensembl_id"]``, else the var index; "" skipped)
    with a non-zero count in some cell, after the special tokens of ``model_version``, in
    column order; columns sharing an id are one gene (their counts summed). A gene's median
    is Geneformer's: the median, over the cells where the gene is non-zero, of
    count / n_counts * 10,000.
    """
    specials = SPECIAL_TOKENS[check_model_version(model_version)]
    source = "adata"
    X = as_csr(adata.X, source)
    check_raw_counts(X.data, source)
    n_counts = obs_n_counts(adata, X, source)
    if n_counts is None:
        n_counts = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
    _, ids = var_gene_ids(adata)
    named = np.flatnonzero(ids != "")
    codes, genes = pd.factorize(ids[named])  # genes in first-column order
    if genes.size < X.shape[1]:  # columns without an id, or sharing one: sum the counts per gene
        X = X @ sp.csr_matrix((np.ones(named.size, dtype=X.dtype), (named, codes)), shape=(X.shape[1], genes.size))
    by_gene = X.tocsc()
    medians = _column_medians(by_gene.indptr.astype(np.int64), by_gene.indices, by_gene.data, n_counts)
    expressed = np.flatnonzero(medians > 0)
    if expressed.size == 0:
        raise InputError(f"{source}: no gene has a non-zero count; cannot derive a vocabulary from it")
    token = {name: index for index, name in enumerate(specials)}
    token.update({str(gene): len(specials) + i for i, gene in enumerate(genes[expressed])})
    return GeneDictionaries(token, {str(gene): float(medians[i]) for i, gene in zip(expressed, genes[expressed])})


@numba.njit(cache=True)
def _column_medians(indptr, rows, counts, n_counts):  # pragma: no cover - compiled
    """Per column of a CSC matrix, the median of count / n_counts * 10,000 over its non-zeros (0: none)."""
    medians = np.zeros(indptr.size - 1)
    widest = 0
    for column in range(indptr.size - 1):
        widest = max(widest, indptr[column + 1] - indptr[column])
    values = np.empty(widest)
    for column in range(indptr.size - 1):
        found = 0
        for k in range(indptr[column], indptr[column + 1]):
            if counts[k] > 0:
                values[found] = (counts[k] / n_counts[rows[k]]) * TARGET_SUM
                found += 1
        if found:
            medians[column] = np.median(values[:found])
    return medians
