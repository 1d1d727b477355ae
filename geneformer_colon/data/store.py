"""The token store: tokenized cells on disk, memory-mapped, built once per input and settings.

Layout of one store directory::

    tokens.npy    flat array of every cell's token ids, one cell after another
    offsets.npy   int64, n_cells + 1: cell i is tokens[offsets[i]:offsets[i + 1]]
    cells.csv     per cell: cell_id, donor, label, cell_type, sample, length
    meta.json     the key's ingredients, vocabulary size, special token ids, dropped cells

The directory name is a hash of the input file, the dictionaries and the tokenizer settings,
so a change in any of them builds a new store and an unchanged input reuses the old one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from geneformer_colon.data.dictionaries import GeneDictionaries
from geneformer_colon.data.tokenizer import TokenizerSettings, tokenize_cells
from geneformer_colon.errors import InputError
from geneformer_colon.io import atomic_path

log = logging.getLogger(__name__)

STORE_FORMAT = 1
CELL_COLUMNS = ("donor", "label", "cell_type", "sample")


@dataclass(frozen=True)
class TokenStore:
    """A built store, opened read-only; ``tokens`` is a memory map, not an in-RAM copy."""

    directory: Path
    tokens: np.ndarray
    offsets: np.ndarray
    cells: pd.DataFrame
    meta: dict

    @classmethod
    def open(cls, directory: str | Path) -> TokenStore:
        directory = Path(directory)
        return cls(
            directory=directory,
            tokens=np.load(directory / "tokens.npy", mmap_mode="r"),
            offsets=np.load(directory / "offsets.npy"),
            cells=pd.read_csv(directory / "cells.csv", dtype=str, keep_default_na=False).assign(
                length=lambda frame: frame["length"].astype(np.int64)
            ),
            meta=json.loads((directory / "meta.json").read_text()),
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def cell_tokens(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]


def store_key(input_fingerprint: str, dictionaries: GeneDictionaries, settings: TokenizerSettings) -> str:
    """Hash of everything a store's content depends on."""
    digest = hashlib.sha256()
    for part in (
        f"format={STORE_FORMAT}",
        input_fingerprint,
        dictionaries.fingerprint(),
        json.dumps(asdict(settings), sort_keys=True),
    ):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def build_store(
    adata: ad.AnnData, dictionaries: GeneDictionaries, settings: TokenizerSettings, directory: Path, source: str
) -> None:
    """Tokenize ``adata`` and write a store at ``directory`` (atomically)."""
    missing = [column for column in CELL_COLUMNS if column not in adata.obs]
    if missing:
        raise InputError(
            f"{source}: obs lacks {missing}; read the data through data=kul3|h5ad|synthetic, "
            "which writes donor, label, cell_type and sample"
        )
    tokenized = tokenize_cells(adata, dictionaries, settings, source=source)
    lengths = tokenized.lengths
    keep = lengths > 0
    offsets = np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64)
    cells = adata.obs.loc[keep, list(CELL_COLUMNS)].astype(str)
    cells.insert(0, "cell_id", adata.obs_names[keep].astype(str))
    cells["length"] = lengths[keep]
    meta = {
        "format": STORE_FORMAT,
        "source": source,
        "settings": asdict(settings),
        "input_size": settings.resolved_input_size,
        "vocab_size": len(dictionaries.token),
        "special_tokens": {name: dictionaries.token[name] for name in dictionaries.token if name.startswith("<")},
        "n_cells": int(keep.sum()),
        "n_dropped_empty": int(tokenized.n_empty),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        np.save(tmp / "tokens.npy", tokenized.tokens)
        np.save(tmp / "offsets.npy", offsets)
        cells.to_csv(tmp / "cells.csv", index=False)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


def open_or_build_store(
    root: str | Path,
    input_path: str | Path,
    input_fingerprint: str,
    load_adata: Callable[[], ad.AnnData],
    dictionaries: GeneDictionaries,
    settings: TokenizerSettings,
) -> TokenStore:
    """Open the store for these inputs under ``root``, building it first if it does not exist.

    ``load_adata`` is only called when a build is needed, so a cached store costs no read
    of the expression matrix.
    """
    directory = Path(root) / store_key(input_fingerprint, dictionaries, settings)
    if (directory / "meta.json").is_file():
        log.info("token store: reusing %s", directory)
    else:
        started = time.perf_counter()
        build_store(load_adata(), dictionaries, settings, directory, source=str(input_path))
        log.info("token store: built %s in %.1f s", directory, time.perf_counter() - started)
    store = TokenStore.open(directory)
    if store.meta["n_dropped_empty"]:
        log.warning(
            "%s: %d cells have no gene in the vocabulary and were dropped",
            input_path,
            store.meta["n_dropped_empty"],
        )
    return store
