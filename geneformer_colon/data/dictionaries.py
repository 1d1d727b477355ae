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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import atomic_path, open_text
from geneformer_colon.data.medians import nonzero_medians

if TYPE_CHECKING:
    from geneformer_colon.data.counts import CellCounts

LFS_POINTER_PREFIX = b"version https://git-lfs"
GENEFORMER_REPOSITORY = "https://huggingface.co/ctheodoris/Geneformer"
# The folder of a Geneformer clone that holds its gene dictionaries.
GENEFORMER_PACKAGE = "geneformer"


def clone_hint(clone_dir: str | Path) -> str:
    """How to get Geneformer's files: the repository and the clone command."""
    return (f"it comes from Geneformer ({GENEFORMER_REPOSITORY}): clone it with `git lfs install && git clone "
            f"{GENEFORMER_REPOSITORY} {clone_dir}` (or set GENEFORMER_DIR to an existing clone)")


def missing_file_hint(path: str | Path) -> str | None:
    """For a missing file of a Geneformer clone (``<clone>/geneformer/...``): the clone hint, else None."""
    parts = Path(path).parts
    if GENEFORMER_PACKAGE not in parts[:-1]:
        return None
    clone = Path(*parts[: len(parts) - 1 - parts[::-1].index(GENEFORMER_PACKAGE)] or ".")
    return clone_hint(clone)

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
        raise InputError(f"{path}: dictionary file not found; "
                         + (missing_file_hint(path) or "check the path in the model config"))
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
        except Exception as err:  # the allowed constructors called with wrong arguments (dict(5)), a cut file, ...
            raise InputError(
                f"{path}: not a Geneformer dictionary pickle ({err}); expected a dict of gene ids "
                "to token ids or medians"
            ) from err
    if not isinstance(loaded, Mapping):
        raise InputError(f"{path}: holds a {type(loaded).__name__}, expected a dict of gene ids")
    return dict(loaded)


# ---- gene names to ids ----


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
    with open_text(path) as handle:
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


# ---- model versions ----

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


INPUT_SIZE = {"V1": 2048, "V2": 4096}
# Tokens around a cell's genes: V1 has none, V2 starts with <cls> and ends with <eos>.
FRAME_TOKENS: dict[str, tuple[str, ...]] = {"V1": (), "V2": ("<cls>", "<eos>")}


@dataclass(frozen=True)
class TokenizerSettings:
    """What shapes the token sequences (and so belongs in a token store's cache key)."""

    model_version: str = "V1"
    input_size: int | None = None

    def __post_init__(self) -> None:
        check_model_version(self.model_version)
        if self.input_size is not None and int(self.input_size) <= len(FRAME_TOKENS[self.model_version]):
            raise InputError(
                f"input_size {self.input_size} leaves no room for a gene; use a positive size "
                f"(default {INPUT_SIZE[self.model_version]} for {self.model_version})"
            )

    @property
    def resolved_input_size(self) -> int:
        """Tokens per cell at most, special tokens included."""
        return INPUT_SIZE[self.model_version] if self.input_size is None else int(self.input_size)

    @property
    def gene_budget(self) -> int:
        """Genes per cell at most."""
        return self.resolved_input_size - len(FRAME_TOKENS[self.model_version])


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


# A folder of dictionaries, named as Geneformer names them.
TOKEN_FILE = "token_dictionary.pkl"
MEDIAN_FILE = "gene_median_dictionary.pkl"
MAPPING_FILE = "ensembl_mapping_dict.pkl"
# Beside a checkpoint's dictionaries (pretrain.py's hf/, an export): how its cells were tokenized.
SETTINGS_FILE = "tokenizer_settings.json"


def save_settings(directory: Path, settings: TokenizerSettings, dictionaries: GeneDictionaries) -> None:
    """How cells were tokenized with ``dictionaries``, as :data:`SETTINGS_FILE` in ``directory``."""
    described = {**asdict(settings), "input_size": settings.resolved_input_size,
                 "gene_mapping": dictionaries.mapping is not None}
    (directory / SETTINGS_FILE).write_text(json.dumps(described, indent=2) + "\n")


def load_settings(directory: Path) -> dict[str, Any] | None:
    """What :func:`save_settings` wrote in ``directory``; None where it wrote nothing."""
    path = directory / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


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

    @classmethod
    def load_directory(cls, directory: str | os.PathLike[str]) -> GeneDictionaries:
        """What :meth:`save` wrote to ``directory`` (the mapping where there is one)."""
        directory = Path(directory)
        mapping = directory / MAPPING_FILE
        return cls.load(directory / TOKEN_FILE, directory / MEDIAN_FILE, mapping if mapping.is_file() else None)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the dictionaries as plain pickles, named as Geneformer names them."""
        directory = Path(directory)
        files = {TOKEN_FILE: self.token, MEDIAN_FILE: self.median}
        if self.mapping is not None:
            files[MAPPING_FILE] = self.mapping
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


def derive_dictionaries(cells: CellCounts, model_version: str = "V1") -> GeneDictionaries:
    """A vocabulary and gene medians from the cells themselves, for a model trained from scratch.

    The vocabulary is every gene id (``cells.gene_ids``; "" skipped) with a non-zero count in some
    cell, after the special tokens of ``model_version``, in column order; columns sharing an id are
    one gene (their counts summed). A gene's median is Geneformer's: the median, over the cells
    where the gene is non-zero, of count / n_counts * 10,000, computed exactly from the cells'
    chunks (``medians``): memory does not grow with the number of cells.
    """
    specials = SPECIAL_TOKENS[check_model_version(model_version)]
    ids = cells.gene_ids
    named = np.flatnonzero(ids != "")
    codes, genes = pd.factorize(ids[named])  # genes in first-column order
    collapse = None
    if genes.size < ids.size:  # columns without an id, or sharing one: sum the counts per gene
        collapse = sp.csr_matrix((np.ones(named.size, dtype=np.int64), (named, codes)), shape=(ids.size, genes.size))

    def by_gene() -> Iterator[tuple[sp.csr_matrix, np.ndarray]]:
        for counts, n_counts in cells.chunks():
            yield (sp.csr_matrix(counts @ collapse) if collapse is not None else counts), n_counts

    medians = nonzero_medians(by_gene, genes.size)
    expressed = np.flatnonzero(medians > 0)
    if expressed.size == 0:
        raise InputError(f"{cells.source}: no gene has a non-zero count; cannot derive a vocabulary from it")
    token = {name: index for index, name in enumerate(specials)}
    token.update({str(gene): len(specials) + i for i, gene in enumerate(genes[expressed])})
    return GeneDictionaries(token, {str(gene): float(medians[i]) for i, gene in zip(expressed, genes[expressed])})
