"""Where cells come from: each source turns its inputs into one cached canonical ``.h5ad``.

A source is the ``data.source`` node of the config (``conf/data/*.yaml``). Everything after
it (dictionaries, tokenizer, store, splits) sees only the canonical AnnData, so a new kind of
input is one class here plus one YAML file.
"""

from __future__ import annotations

import abc
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from geneformer_colon.data import ingest, synthetic
from geneformer_colon.errors import InputError
from geneformer_colon.io import atomic_path, file_fingerprint

log = logging.getLogger(__name__)

# Part of every cached file's key: bump it when the canonical AnnData changes, to rebuild caches.
CANONICAL_FORMAT = 1


class DataSource(abc.ABC):
    """Produces the canonical AnnData (see ``ingest``) as an ``.h5ad`` under a cache folder."""

    @abc.abstractmethod
    def inputs(self) -> list[Path | None]:
        """The files the AnnData is made from (their fingerprint names the cached file)."""

    @abc.abstractmethod
    def write_canonical(self, path: Path) -> None:
        """Read the inputs and write the canonical AnnData to ``path``."""

    def h5ad(self, cache_dir: str | Path) -> Path:
        """Path of the canonical ``.h5ad``, built only when no file of these inputs exists yet."""
        for path in self.inputs():
            if path is not None and not path.is_file():
                raise InputError(f"{path}: input file not found; {self.missing_hint()}")
        identity = f"{CANONICAL_FORMAT}\0{file_fingerprint(*self.inputs())}\0{self.settings()!r}"
        key = hashlib.sha256(identity.encode()).hexdigest()[:16]
        path = Path(cache_dir) / "ingest" / f"{type(self).__name__.lower()}-{key}.h5ad"
        if not path.is_file():
            log.info("ingest: reading %s", ", ".join(str(p) for p in self.inputs() if p is not None))
            with atomic_path(path) as tmp:
                self.write_canonical(tmp)
        return path

    def settings(self) -> tuple:
        """Options that change the canonical content for the same input files."""
        return ()

    def missing_hint(self) -> str:
        return "check the data config"


@dataclass
class KUL3Source(DataSource):
    """The two GEO files of GSE144735 (KUL3), symbols mapped to Ensembl ids by ``gene_map``."""

    data_dir: str
    gene_map: str | None = None
    matrix_file: str = synthetic.MATRIX_FILE
    annotation_file: str = synthetic.ANNOTATION_FILE

    def inputs(self) -> list[Path | None]:
        root = Path(self.data_dir)
        return [root / self.matrix_file, root / self.annotation_file, Path(self.gene_map) if self.gene_map else None]

    def write_canonical(self, path: Path) -> None:
        matrix, annotation, gene_map = self.inputs()
        ingest.read_kul3(matrix, annotation, gene_map=gene_map).write_h5ad(path)

    def missing_hint(self) -> str:
        return (
            f"download {self.matrix_file} and {self.annotation_file} from GEO (GSE144735) into "
            f"{self.data_dir} (data.source.data_dir), and point data.source.gene_map at Geneformer's "
            "gene_name_id_dict pickle"
        )


@dataclass
class SyntheticKUL3Source(KUL3Source):
    """A synthetic KUL3 look-alike in the real GEO format, generated on first use."""

    n_cells: int = 3000
    n_genes: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        self.data_dir = str(Path(self.data_dir) / f"cells{self.n_cells}-genes{self.n_genes}-seed{self.seed}")
        self.gene_map = str(Path(self.data_dir) / synthetic.GENE_TABLE_FILE)

    def h5ad(self, cache_dir: str | Path) -> Path:
        if not all(path.is_file() for path in self.inputs() if path is not None):
            log.info("synthetic KUL3: writing %d cells x %d genes to %s", self.n_cells, self.n_genes, self.data_dir)
            synthetic.write_synthetic_kul3(self.data_dir, n_cells=self.n_cells, n_genes=self.n_genes, seed=self.seed)
        return super().h5ad(cache_dir)


@dataclass
class H5adSource(DataSource):
    """Any ``.h5ad`` with raw counts; the keys say which obs/var columns and layer to use."""

    path: str
    donor_key: str = "donor"
    label_key: str = "label"
    cell_type_key: str = "cell_type"
    sample_key: str | None = None
    ensembl_key: str | None = "ensembl_id"
    layer: str | None = None

    def inputs(self) -> list[Path | None]:
        return [Path(self.path)]

    def settings(self) -> tuple:
        return (self.donor_key, self.label_key, self.cell_type_key, self.sample_key, self.ensembl_key, self.layer)

    def write_canonical(self, path: Path) -> None:
        ingest.read_h5ad(
            self.path,
            donor_key=self.donor_key,
            label_key=self.label_key,
            cell_type_key=self.cell_type_key,
            sample_key=self.sample_key,
            ensembl_key=self.ensembl_key,
            layer=self.layer,
        ).write_h5ad(path)

    def missing_hint(self) -> str:
        return "set data.source.path to your .h5ad file"
