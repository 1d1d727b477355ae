"""The gene dictionaries a run tokenizes with: the model's own, or derived from its training cells.

With ``model.tokenizer.token_dictionary`` set, the released dictionaries are loaded; without, a
vocabulary and gene medians are derived from the training cells (``dictionaries.derive_dictionaries``)
and cached under a key of the input and those cells, so a run with the same training cells reuses them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from geneformer_colon.common.caches import checked_cache
from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import text_fingerprint
from geneformer_colon.data.dictionaries import GeneDictionaries, derive_dictionaries
from geneformer_colon.data.h5ad import CanonicalCells

log = logging.getLogger(__name__)


def run_dictionaries(tokenizer: Mapping[str, Any], model_version: str, cells: CanonicalCells,
                     training_rows: Callable[[], np.ndarray], cache_dir: Path) -> GeneDictionaries:
    """The dictionaries ``tokenizer`` (the ``model.tokenizer`` config) names, else those derived from the cells
    at ``training_rows()`` (sorted positions; asked for only then)."""
    if not tokenizer.get("token_dictionary"):
        return derived_dictionaries(cells, training_rows(), model_version, cache_dir)
    if not tokenizer.get("gene_median_dictionary"):
        raise InputError(
            "model.tokenizer.gene_median_dictionary: not set; a token dictionary needs its "
            "gene median dictionary (gene_median_dictionary_gc30M.pkl for V1, _gc104M for V2)"
        )
    return GeneDictionaries.load(tokenizer["token_dictionary"], tokenizer["gene_median_dictionary"],
                                 tokenizer.get("gene_mapping"))


def derived_dictionaries(cells: CanonicalCells, rows: np.ndarray, model_version: str, cache_dir: Path
                         ) -> GeneDictionaries:
    """A vocabulary and gene medians of the cells at the sorted positions ``rows``, derived once and cached."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    key = text_fingerprint(cells.identity, model_version, hashlib.sha256(rows.tobytes()).hexdigest())
    directory = Path(cache_dir) / "dictionaries" / key

    def derive(tmp: Path) -> None:
        log.info("deriving a vocabulary and gene medians from %d training cells", len(rows))
        derive_dictionaries(cells.counts(rows), model_version=model_version).save(tmp)

    checked_cache(directory, derive)
    return GeneDictionaries.load_directory(directory)
