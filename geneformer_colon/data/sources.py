"""Where cells come from: each source turns its inputs into one cached canonical ``.h5ad``.

A source is the ``data.source`` node of the config (``conf/data/*.yaml``). Everything after
it (dictionaries, tokenizer, store, splits) sees only the canonical AnnData (``canonical``), so a
new kind of input is one class here plus one YAML file.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from geneformer_colon.data import h5ad, kul3, synthetic
from geneformer_colon.data.canonical import write_canonical
from geneformer_colon.data.dictionaries import missing_file_hint
from geneformer_colon.errors import InputError
from geneformer_colon.io import build_once, file_fingerprint, text_fingerprint

log = logging.getLogger(__name__)

# Part of every cached file's key: bump it when the canonical AnnData changes, to rebuild caches.
CANONICAL_FORMAT = 2
_WRITE_CHUNK_CELLS = 10_000


class DataSource(abc.ABC):
    """Produces the canonical AnnData as an ``.h5ad`` under a cache folder, once per identity."""

    kind: ClassVar[str] = "files"  # what provenance() calls the source

    @abc.abstractmethod
    def inputs(self) -> list[Path | None]:
        """The files the AnnData is made from."""

    @abc.abstractmethod
    def write_canonical(self, path: Path) -> None:
        """Read the inputs and write the canonical AnnData to ``path``."""

    @abc.abstractmethod
    def describe(self) -> str:
        """The user's input, as error messages name it (never the cache copy)."""

    def identity(self) -> str:
        """What the canonical content depends on: the input files (path, size, time) and settings."""
        return file_fingerprint(*self.inputs()) + repr(self.settings())

    def settings(self) -> tuple:
        """Options that change the canonical content for the same input files."""
        return ()

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

    def canonical(self, cache_dir: str | Path) -> Path:
        """Path of the canonical ``.h5ad``, built only when no file of this identity exists yet.

        Two processes asking at once build it once (a lock); a build killed half-way leaves no
        file at the final name, and its leftovers are removed by the next build.
        """
        self.check_inputs()
        key = text_fingerprint(CANONICAL_FORMAT, self.identity())
        path = Path(cache_dir) / "ingest" / f"{type(self).__name__.lower()}-{key}.h5ad"
        if build_once(path, self.write_canonical):
            log.info("ingest: %s -> %s", self.describe(), path)
        return path


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

    def write_canonical(self, path: Path) -> None:
        matrix, annotation, gene_map = self.inputs()
        adata = kul3.read_kul3(matrix, annotation, gene_map=gene_map)
        chunks = (adata.X[start : start + _WRITE_CHUNK_CELLS] for start in range(0, adata.n_obs, _WRITE_CHUNK_CELLS))
        write_canonical(path, chunks, adata.n_vars, adata.obs, adata.var)

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

    def __post_init__(self) -> None:
        # The generator's version names the folder: an upgrade writes a new cohort beside the old.
        name = f"v{synthetic.GENERATOR_VERSION}-cells{self.n_cells}-genes{self.n_genes}-seed{self.seed}"
        if self.donor_shift != 1.0:
            name += f"-shift{self.donor_shift:g}"
        self.data_dir = str(Path(self.data_dir) / name)
        self.gene_map = str(Path(self.data_dir) / synthetic.GENE_TABLE_FILE)

    def identity(self) -> str:
        return repr((synthetic.GENERATOR_VERSION, self.n_cells, self.n_genes, self.seed, self.donor_shift))

    def check_inputs(self) -> None:
        done = self.inputs()[0]
        if build_once(Path(self.data_dir), self._generate, done=lambda _: done.is_file()):
            log.info("synthetic KUL3: wrote %d cells x %d genes to %s", self.n_cells, self.n_genes, self.data_dir)

    def _generate(self, directory: Path) -> None:
        synthetic.write_synthetic_kul3(directory, n_cells=self.n_cells, n_genes=self.n_genes, seed=self.seed,
                                       donor_shift=self.donor_shift)

    def describe(self) -> str:
        return f"synthetic KUL3 ({self.data_dir})"

    def provenance(self) -> dict[str, Any]:
        return {"source": "synthetic", "generator_version": synthetic.GENERATOR_VERSION, "n_cells": self.n_cells,
                "n_genes": self.n_genes, "seed": self.seed, "donor_shift": self.donor_shift, "folder": self.data_dir}


@dataclass
class H5adSource(DataSource):
    """Any ``.h5ad`` with raw counts; the keys say which obs/var columns and layer to use."""

    kind: ClassVar[str] = "h5ad"

    path: str
    donor_key: str = "donor"
    label_key: str = "label"
    cell_type_key: str | None = "cell_type"
    sample_key: str | None = None
    ensembl_key: str | None = "ensembl_id"
    layer: str | None = None

    def inputs(self) -> list[Path | None]:
        return [Path(self.path)]

    def settings(self) -> tuple:
        return (self.donor_key, self.label_key, self.cell_type_key, self.sample_key, self.ensembl_key, self.layer)

    def write_canonical(self, path: Path) -> None:
        h5ad.h5ad_to_canonical(self.path, path, donor_key=self.donor_key, label_key=self.label_key,
                               cell_type_key=self.cell_type_key, sample_key=self.sample_key,
                               ensembl_key=self.ensembl_key, layer=self.layer)

    def describe(self) -> str:
        return str(self.path)

    def missing_hint(self, path: Path) -> str:
        return "set data.source.path to your .h5ad file"
