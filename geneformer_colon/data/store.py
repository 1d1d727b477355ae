"""The token store: tokenized cells on disk, memory-mapped, built once per input and settings.

Layout of one store directory::

    tokens.bin    every cell's token ids, one cell after another (raw, dtype in meta.json)
    offsets.npy   int64, n_cells + 1: cell i is tokens[offsets[i]:offsets[i + 1]]
    cells.csv     per cell: cell_id, donor, label, cell_type, sample, length
    meta.json     the key's ingredients, vocabulary size, special token ids, dropped cells

The directory name is a hash of the input's identity (a canonical file's name, or a user's
h5ad's fingerprint and column keys), the dictionaries and the tokenizer settings, so a change in
any of them builds a new store and an unchanged input reuses the old one. The build reads the
input a chunk of cells at a time and appends each chunk's tokens, so its memory does not grow with
the number of cells; the result does not depend on the chunk size. A store whose files no longer match
what was built (``tokens.bin`` truncated by a full disk or a killed copy) is built again
(``common.caches``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from geneformer_colon.common.caches import checked_cache
from geneformer_colon.data.canonical import OBS_COLUMNS
from geneformer_colon.data.dictionaries import GeneDictionaries
from geneformer_colon.data.h5ad import CHUNK_CELLS, CanonicalCells
from geneformer_colon.data.token_rows import TokenRows
from geneformer_colon.data.tokenizer import TokenizerSettings, tokenize_chunks

log = logging.getLogger(__name__)

STORE_FORMAT = 2


@dataclass(frozen=True)
class TokenStore(TokenRows):
    """A built store, opened read-only; ``tokens`` is a memory map, not an in-RAM copy."""

    directory: Path
    tokens: np.ndarray
    offsets: np.ndarray
    cells: pd.DataFrame
    meta: dict

    @classmethod
    def open(cls, directory: str | Path) -> TokenStore:
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text())
        tokens_file = directory / "tokens.bin"
        tokens = (np.memmap(tokens_file, dtype=meta["dtype"], mode="r") if tokens_file.stat().st_size
                  else np.zeros(0, dtype=meta["dtype"]))
        return cls(
            directory=directory,
            tokens=tokens,
            offsets=np.load(directory / "offsets.npy"),
            cells=pd.read_csv(directory / "cells.csv", dtype=str, keep_default_na=False).assign(
                length=lambda frame: frame["length"].astype(np.int64)
            ),
            meta=meta,
        )

    def __reduce__(self) -> tuple:
        """Pickled (a DataLoader worker under spawn or forkserver) as its directory: the copy opens the store again,
        its own memory map of ``tokens.bin``, rather than carrying every token through the pickle."""
        return type(self).open, (self.directory,)

    @property
    def source(self) -> str:
        """The user's input the store was made from (what error messages name)."""
        return str(self.meta["source"])


def store_key(cells: CanonicalCells, dictionaries: GeneDictionaries, settings: TokenizerSettings) -> str:
    """Hash of everything a store's content depends on (``cells.identity`` is its input's)."""
    digest = hashlib.sha256()
    for part in (f"format={STORE_FORMAT}", cells.identity, dictionaries.fingerprint(),
                 json.dumps(asdict(settings), sort_keys=True)):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def build_store(cells: CanonicalCells, dictionaries: GeneDictionaries, settings: TokenizerSettings,
                directory: Path, chunk_cells: int = CHUNK_CELLS) -> None:
    """Tokenize the canonical cells into a store at ``directory``, chunk by chunk."""
    lengths = []
    n_empty = 0
    dtype = None
    directory.mkdir(parents=True)
    with open(directory / "tokens.bin", "wb") as tokens_file:
        for part in tokenize_chunks(cells.counts(chunk_cells=chunk_cells), dictionaries, settings):
            part.tokens.tofile(tokens_file)
            lengths.append(part.lengths)
            n_empty += part.n_empty
            dtype = part.tokens.dtype
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    keep = lengths > 0
    offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(lengths[keep], out=offsets[1:])
    table = cells.obs.loc[keep, list(OBS_COLUMNS)].astype(str)
    table.insert(0, "cell_id", cells.obs.index[keep].astype(str))
    table["length"] = lengths[keep]
    meta = {
        "format": STORE_FORMAT,
        "source": cells.source,
        "settings": asdict(settings),
        "input_size": settings.resolved_input_size,
        "vocab_size": len(dictionaries.token),
        "dtype": np.dtype(dtype or np.uint16).name,
        "special_tokens": {name: dictionaries.token[name] for name in dictionaries.token if name.startswith("<")},
        "n_cells": int(keep.sum()),
        "n_dropped_empty": int(n_empty),
    }
    np.save(directory / "offsets.npy", offsets)
    table.to_csv(directory / "cells.csv", index=False)
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))


def open_or_build_store(root: str | Path, cells: CanonicalCells, dictionaries: GeneDictionaries,
                        settings: TokenizerSettings) -> TokenStore:
    """Open the store of these cells under ``root``, building it first (once, under a lock) if needed."""
    directory = Path(root) / store_key(cells, dictionaries, settings)
    started = time.perf_counter()
    if checked_cache(directory, lambda tmp: build_store(cells, dictionaries, settings, tmp)):
        log.info("token store: built %s in %.1f s", directory, time.perf_counter() - started)
    store = TokenStore.open(directory)
    if store.meta["n_dropped_empty"]:
        log.warning("%s: %d cells have no gene in the vocabulary and were dropped", cells.source,
                    store.meta["n_dropped_empty"])
    return store
