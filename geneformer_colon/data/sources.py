"""Where cells come from: each source gives its cells in canonical form (``h5ad.CanonicalCells``).

A source is the ``data.source`` node of the config (``conf/data/*.yaml``). Everything after
it (dictionaries, tokenizer, store, splits) sees only the canonical cells (``canonical``), so a
new kind of input is one class here plus one YAML file. A format that must be parsed (GEO text)
is parsed once into a cached canonical ``.h5ad``; an ``.h5ad`` of counts is read where it is.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from geneformer_colon.common.caches import checked_cache
from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import file_fingerprint, text_fingerprint
from geneformer_colon.data import kul3, synthetic
from geneformer_colon.data.canonical import write_canonical
from geneformer_colon.data.dictionaries import missing_file_hint
from geneformer_colon.data.h5ad import CanonicalCells, H5adKeys

log = logging.getLogger(__name__)

# Part of every cached file's key: bump it when the canonical AnnData changes, to rebuild caches.
CANONICAL_FORMAT = 2
_WRITE_CHUNK_CELLS = 10_000


class DataSource(abc.ABC):
    """Gives the cells of its inputs in canonical form, under an identity that changes when they do."""

    kind: ClassVar[str] = "files"  # what provenance() calls the source

    @abc.abstractmethod
    def inputs(self) -> list[Path | None]:
        """The files the cells are read from."""

    @abc.abstractmethod
    def cells(self, cache_dir: str | Path) -> CanonicalCells:
        """The cells in canonical form (parsed into ``cache_dir`` first where the format needs it)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """The user's input, as error messages name it (never a cache file)."""

    def identity(self) -> str:
        """What the canonical content depends on: the input files (path, size, time) and settings."""
        return file_fingerprint(*self.inputs()) + repr(self.settings())

    def settings(self) -> tuple:
        """Options that change the canonical content for the same input files."""
        return ()

    def key(self) -> str:
        """The identity as a name for cache entries: the source's kind and a hash."""
        return f"{type(self).__name__.lower()}-{text_fingerprint(CANONICAL_FORMAT, self.identity())}"

    def provenance(self) -> dict[str, Any]:
        """Where the cells came from, as a run records it (metrics.json ``data``; the model card and history.md
        name it): the kind of source and each input file's path, size and fingerprint (path, size, time)."""
        return {"source": self.kind, "inputs": [
            {"path": str(path), "bytes": path.stat().st_size, "fingerprint": file_fingerprint(path)[:16]}
            for path in self.inputs() if path is not None and path.is_file()]}

    def missing_hint(self, path: Path) -> str:
        """What to do about the missing input ``path``."""
        return "check the data config"

    def check_inputs(self) -> None:
        for path in self.inputs():
            if path is not None and not path.is_file():
                raise InputError(f"{path}: input file not found; {self.missing_hint(path)}")


@dataclass
class KUL3Source(DataSource):
    """The two GEO files of GSE144735 (KUL3), symbols mapped to Ensembl ids by ``gene_map``."""

    kind: ClassVar[str] = "kul3"

    data_dir: str
    gene_map: str | None = None
    matrix_file: str = kul3.MATRIX_FILE
    annotation_file: str = kul3.ANNOTATION_FILE

    def inputs(self) -> list[Path | None]:
        root = Path(self.data_dir)
        return [root / self.matrix_file, root / self.annotation_file, Path(self.gene_map) if self.gene_map else None]

    def canonical(self, cache_dir: str | Path) -> Path:
        """Path of the canonical ``.h5ad`` parsed from the GEO files, built only when none of this identity exists.

        Two processes asking at once build it once (a lock); a build killed half-way leaves no
        file at the final name, and its leftovers are removed by the next build; a damaged file is built again.
        """
        self.check_inputs()
        path = Path(cache_dir) / "ingest" / f"{self.key()}.h5ad"
        if checked_cache(path, self.write_canonical):
            log.info("ingest: %s -> %s", self.describe(), path)
        return path

    def write_canonical(self, path: Path) -> None:
        """Parse the GEO files and write the canonical AnnData to ``path``."""
        matrix, annotation, gene_map = self.inputs()
        adata = kul3.read_kul3(matrix, annotation, gene_map=gene_map)
        chunks = (adata.X[start : start + _WRITE_CHUNK_CELLS] for start in range(0, adata.n_obs, _WRITE_CHUNK_CELLS))
        write_canonical(path, chunks, adata.n_vars, adata.obs, adata.var)

    def cells(self, cache_dir: str | Path) -> CanonicalCells:
        path = self.canonical(cache_dir)
        return CanonicalCells(path, self.describe(), identity=path.name, checked=True)

    def describe(self) -> str:
        return str(Path(self.data_dir) / self.matrix_file)

    def missing_hint(self, path: Path) -> str:
        if self.gene_map and path == Path(self.gene_map):
            return missing_file_hint(path) or (
                "point data.source.gene_map at Geneformer's gene_name_id_dict pickle or a symbol/id TSV")
        return (f"download {self.matrix_file} and {self.annotation_file} from GEO (GSE144735) into "
                f"{self.data_dir} (data.source.data_dir)")


@dataclass
class SyntheticKUL3Source(KUL3Source):
    """A synthetic KUL3 look-alike in the real GEO format, generated on first use.

    Its identity is its generator settings, not its files' times: regenerating the same
    cohort reuses the caches built from it.
    """

    n_cells: int = 3000
    n_genes: int = 2000
    seed: int = 0
    donor_shift: float = 1.0
    # null: every donor effect; a list keeps only those (synthetic.DONOR_EFFECTS)
    donor_effects: Sequence[str] | None = None

    def __post_init__(self) -> None:
        self.donor_effects = tuple(self.donor_effects) if self.donor_effects else synthetic.DONOR_EFFECTS
        # The generator's version names the folder: an upgrade writes a new cohort beside the old.
        name = f"v{synthetic.GENERATOR_VERSION}-cells{self.n_cells}-genes{self.n_genes}-seed{self.seed}"
        if self.donor_shift != 1.0:
            name += f"-shift{self.donor_shift:g}"
        if set(self.donor_effects) != set(synthetic.DONOR_EFFECTS):
            name += "-only-" + "-".join(sorted(self.donor_effects))
        self.data_dir = str(Path(self.data_dir) / name)
        self.gene_map = str(Path(self.data_dir) / synthetic.GENE_TABLE_FILE)

    def identity(self) -> str:
        effects = () if set(self.donor_effects) == set(synthetic.DONOR_EFFECTS) else tuple(sorted(self.donor_effects))
        return repr((synthetic.GENERATOR_VERSION, self.n_cells, self.n_genes, self.seed, self.donor_shift, *effects))

    def check_inputs(self) -> None:
        if checked_cache(Path(self.data_dir), self._generate):
            log.info("synthetic KUL3: wrote %d cells x %d genes to %s", self.n_cells, self.n_genes, self.data_dir)

    def _generate(self, directory: Path) -> None:
        synthetic.write_synthetic_kul3(directory, n_cells=self.n_cells, n_genes=self.n_genes, seed=self.seed,
                                       donor_shift=self.donor_shift, donor_effects=self.donor_effects)

    def describe(self) -> str:
        return f"synthetic KUL3 ({self.data_dir})"

    def provenance(self) -> dict[str, Any]:
        return {"source": "synthetic", "generator_version": synthetic.GENERATOR_VERSION, "n_cells": self.n_cells,
                "n_genes": self.n_genes, "seed": self.seed, "donor_shift": self.donor_shift,
                "donor_effects": list(self.donor_effects), "folder": self.data_dir}


@dataclass(frozen=True)
class H5adSource(H5adKeys, DataSource):
    """Any ``.h5ad`` with raw counts, read in place; the keys (:class:`H5adKeys`) say which obs/var columns and
    layer hold the canonical fields."""

    kind: ClassVar[str] = "h5ad"

    path: str = field(kw_only=True)

    def inputs(self) -> list[Path | None]:
        return [Path(self.path)]

    def settings(self) -> tuple:
        return tuple(getattr(self, key.name) for key in fields(H5adKeys))

    def cells(self, cache_dir: str | Path) -> CanonicalCells:
        """The file read where it is, through its keys (no copy: ``cache_dir`` is not written)."""
        self.check_inputs()
        return CanonicalCells(self.path, self.describe(), identity=self.key(), keys=self)

    def describe(self) -> str:
        return str(self.path)

    def missing_hint(self, path: Path) -> str:
        return "set data.source.path to your .h5ad file"
