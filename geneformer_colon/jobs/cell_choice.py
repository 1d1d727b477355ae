"""The cells and genes that ``perturb`` and ``explain`` look at, and the goal state's centroid.

Cells come from a run's token store (its validation and test cells, by default) or from any h5ad
tokenized as ``predict`` tokenizes it; ``--where column=value`` keeps the cells whose obs matches
(values of one column are alternatives, columns must all match) and ``--max-cells`` draws a seeded
sample. Genes are named by Ensembl id or by symbol (a run's own symbols, or ``--gene-names``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from geneformer_colon.assembly.builders import build_datamodule
from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.common.errors import InputError
from geneformer_colon.common.names import EVAL_SPLITS, TRAIN
from geneformer_colon.data.datamodule import CellDataModule
from geneformer_colon.data.dictionaries import read_gene_name_map
from geneformer_colon.data.h5ad import H5adReader
from geneformer_colon.data.token_rows import TokenRows
from geneformer_colon.data.tokenizer import TokenizedCells
from geneformer_colon.jobs.evaluate import run_config
from geneformer_colon.jobs.predict import GeneIds, tokenized_chunks
from geneformer_colon.runs.layout import RunLayout

OBS_COLUMNS = ("donor", "label", "cell_type")


@dataclass
class CellSet:
    """Cells as token rows: ``tokens`` holds them, ``rows`` says which (one per cell, in ``obs`` order)."""

    tokens: TokenRows
    rows: np.ndarray
    obs: pd.DataFrame

    def subset(self, keep: np.ndarray) -> CellSet:
        return CellSet(self.tokens, self.rows[keep], self.obs[keep])


def parse_where(conditions: Sequence[str]) -> dict[str, list[str]]:
    """``["label=Tumor", "donor=KUL01", "donor=KUL19"]`` -> ``{"label": ["Tumor"], "donor": ["KUL01", "KUL19"]}``."""
    parsed: dict[str, list[str]] = {}
    for condition in conditions:
        column, equals, value = condition.partition("=")
        if not equals or not column or not value:
            raise InputError(f"--where {condition!r}: expected COLUMN=VALUE, e.g. --where label=Tumor")
        parsed.setdefault(column, []).append(value)
    return parsed


def where_mask(obs: pd.DataFrame, where: dict[str, list[str]], source: str) -> np.ndarray:
    """The cells matching every column's values; a missing column or no match at all is an input error."""
    keep = np.ones(len(obs), dtype=bool)
    for column, values in where.items():
        if column not in obs.columns:
            raise InputError(f"{source}: --where {column}=...: no obs column {column!r} (columns: "
                             f"{', '.join(map(str, obs.columns))}); filter on one of those")
        keep &= obs[column].astype(str).isin(values).to_numpy()
    if where and not keep.any():
        asked = " ".join(f"--where {column}={value}" for column, values in where.items() for value in values)
        raise InputError(f"{source}: {asked} matches no cell; check the values (e.g. obs['{next(iter(where))}'] holds "
                         f"{sorted(map(str, obs[next(iter(where))].unique()))[:10]})")
    return keep


def sample_mask(keep: np.ndarray, max_cells: int | None, seed: int) -> np.ndarray:
    """At most ``max_cells`` of the kept cells, drawn reproducibly (seeded), in their order."""
    chosen = np.flatnonzero(keep)
    if max_cells is not None and len(chosen) > max_cells:
        chosen = np.sort(np.random.default_rng(seed).choice(chosen, max_cells, replace=False))
    mask = np.zeros_like(keep)
    mask[chosen] = True
    return mask


def run_datamodule(run_dir: Path) -> CellDataModule:
    return build_datamodule(run_config(RunLayout(run_dir)))


def run_cells(datamodule: CellDataModule, splits: Sequence[str] = EVAL_SPLITS) -> CellSet:
    """A run's cells of ``splits`` from its token store; obs: donor, label, cell type, sample, split."""
    positions = np.concatenate([datamodule.splits[split].positions for split in splits])
    obs = pd.concat([datamodule.split_cells(split).assign(split=split) for split in splits])
    obs = obs.set_index("cell_id").drop(columns=["length"], errors="ignore")
    obs.index = obs.index.astype(str)
    return CellSet(datamodule.store, positions, obs)


def file_cells(model: TrainedClassifier, path: Path, genes: GeneIds, layer: str | None,
               keep: np.ndarray | None = None) -> CellSet:
    """The cells of an h5ad (only those ``keep`` marks, default all), tokenized a chunk at a time; cells without a
    gene of the vocabulary left out."""
    with H5adReader(path, layer, layer_setting="--layer") as source:
        obs = source.obs.copy()
        keep = np.ones(len(obs), dtype=bool) if keep is None else keep
        parts, kept = [], []
        for rows, chunk in tokenized_chunks(model, source, genes):
            wanted = np.flatnonzero(keep[rows] & (chunk.lengths > 0))
            parts.extend(chunk.cell_tokens(int(i)) for i in wanted)
            kept.append(wanted + rows.start)
    kept_rows = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    lengths = np.array([len(part) for part in parts], dtype=np.int64)
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    cells = TokenizedCells(tokens, offsets, int(keep.sum()) - len(parts))
    obs = obs.iloc[kept_rows]
    obs.index = obs.index.astype(str)
    return CellSet(cells, np.arange(len(parts)), obs)


def file_obs(path: Path) -> pd.DataFrame:
    with H5adReader(path) as source:
        return source.obs.copy()


def goal_centroid(model: TrainedClassifier, cells: CellSet, label_key: str, goal: str, run_dir: Path | None,
                  batch_size: int, device: str) -> tuple[np.ndarray, str]:
    """The mean embedding of the goal class's cells (``obs[label_key] == goal``), or, where the cells carry no such
    label, of the run's own training cells of that class; and where it came from."""
    if label_key in cells.obs.columns and (cells.obs[label_key].astype(str) == goal).any():
        goal_cells = cells.subset((cells.obs[label_key].astype(str) == goal).to_numpy())
        where = f"{len(goal_cells.rows)} {goal} cells of the input"
    elif run_dir is not None:
        goal_cells = run_cells(run_datamodule(run_dir), (TRAIN,))
        goal_cells = goal_cells.subset((goal_cells.obs["label"].astype(str) == goal).to_numpy())
        where = f"{len(goal_cells.rows)} {goal} training cells of the run"
    else:
        raise InputError(f"obs['{label_key}']: no {goal} cell in the input to place the goal state, and an export "
                         "holds no training cells; give --label-key naming the input's class column, or the run "
                         "directory instead of the export")
    _, embeddings = model.apply(goal_cells.tokens, goal_cells.rows, batch_size, device=device)
    return np.nanmean(embeddings, axis=0), where


@dataclass(frozen=True)
class GeneNames:
    """Ensembl id <-> token id (the model's vocabulary) and Ensembl id <-> symbol (where a name map is known)."""

    token_of: dict[str, int]
    symbol_of: dict[str, str]

    @property
    def id_of_symbol(self) -> dict[str, str]:
        return {symbol: gene for gene, symbol in self.symbol_of.items()}

    def ids(self, tokens: np.ndarray) -> np.ndarray:
        genes = {token: gene for gene, token in self.token_of.items()}
        return np.array([genes[int(token)] for token in tokens], dtype=object)

    def symbols(self, genes: Sequence[str]) -> list[str]:
        return [self.symbol_of.get(gene, "") for gene in genes]

    def tokens_of(self, names: Sequence[str], what: str) -> np.ndarray:
        """Token ids of genes named by Ensembl id or symbol; a name outside the vocabulary is an input error."""
        by_symbol = self.id_of_symbol
        tokens = []
        for name in names:
            gene = name if name in self.token_of else by_symbol.get(name, name)
            if gene not in self.token_of:
                size = sum(not token.startswith("<") for token in self.token_of)
                raise InputError(f"{what}: gene {name!r} is not in the model's vocabulary of {size} genes; give "
                                 "Ensembl ids or symbols of vocabulary genes (symbols need a name map: --gene-names)")
            tokens.append(self.token_of[gene])
        return np.asarray(tokens, dtype=np.int64)


def gene_names(model: TrainedClassifier, datamodule: CellDataModule | None, gene_names_file: str | None) -> GeneNames:
    """The vocabulary, and symbols from ``--gene-names`` or else from the run's own input (its var index)."""
    token_of = {gene: token for gene, token in model.dictionaries.token.items() if not gene.startswith("<")}
    if gene_names_file is not None:
        symbol_of = {gene: symbol for symbol, gene in read_gene_name_map(gene_names_file).items()}
    elif datamodule is not None and datamodule.cells is not None:
        var = datamodule.cells.var
        symbol_of = {gene: str(symbol) for symbol, gene in zip(var["symbol"], var["ensembl_id"].astype(str)) if gene}
    else:
        symbol_of = {}
    return GeneNames(token_of, symbol_of)


def check_cell_counts(max_cells: int | None, min_cells: int) -> None:
    """``--max-cells`` and ``--min-cells`` are counts of cells: one line before anything is read otherwise."""
    if max_cells is not None and max_cells < 1:
        raise InputError(f"--max-cells {max_cells}: give a number of cells >= 1 (or leave it out: every chosen cell)")
    if min_cells < 1:
        raise InputError(f"--min-cells {min_cells}: give a number of cells >= 1")


GENE_FILE_SUFFIXES = (".txt", ".tsv", ".csv", ".gmt", ".list")


def read_gene_list(value: str) -> list[str]:
    """A comma-separated list of genes, or a file of them (one a line, ``#`` comments)."""
    path = Path(value)
    if not path.is_file() and (os.sep in value or path.suffix.lower() in GENE_FILE_SUFFIXES):
        raise InputError(f"{value}: no such file; give a file of genes (one a line) or a comma-separated list")
    if path.is_file():
        lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
        names = [line for line in lines if line]
        if not names:
            raise InputError(f"{path}: no gene in the file; one Ensembl id or symbol a line")
        return names
    return [name.strip() for name in value.split(",") if name.strip()]


@dataclass
class CellChoice:
    """The chosen cells, every candidate cell before ``--where`` (for a goal state's centroid), the run directory
    (None for an export) and the gene names."""

    cells: CellSet
    every: CellSet
    run_dir: Path | None
    names: GeneNames


def select_cells(model: TrainedClassifier, model_path: str | Path, input_path: str | Path | None,
                 where: Sequence[str], max_cells: int | None, seed: int, gene_ids: GeneIds, layer: str | None,
                 also: Callable[[pd.DataFrame], np.ndarray] | None = None) -> CellChoice:
    """The run's validation and test cells, or an h5ad's (tokenized are only the chosen cells and those ``also``
    marks in the file's obs), filtered by ``where`` and sampled to ``max_cells``."""
    # an export names the run it came from, which need not be on this machine: its own dictionaries serve
    run_dir = Path(model_path) if "run_dir" in model.origin and "export" not in model.origin else None
    conditions = parse_where(where)
    if input_path is None:
        if run_dir is None:
            raise InputError(f"{model_path}: an export holds no cells of its own; give an INPUT.h5ad")
        datamodule = run_datamodule(run_dir)
        every = run_cells(datamodule)
        keep = sample_mask(where_mask(every.obs, conditions, f"{model_path} (validation and test cells)"), max_cells,
                           seed)
        return CellChoice(every.subset(keep), every, run_dir, gene_names(model, datamodule, gene_ids.gene_names))
    obs = file_obs(Path(input_path))
    keep = sample_mask(where_mask(obs, conditions, str(input_path)), max_cells, seed)
    every = file_cells(model, Path(input_path), gene_ids, layer, keep | (also(obs) if also else False))
    cells = every.subset(every.obs.index.isin(obs.index[keep].astype(str)))
    if len(cells.rows) == 0:
        raise InputError(f"{input_path}: no chosen cell has a gene of the model's vocabulary; choose other cells or "
                         "check the gene options (--ensembl-key, --gene-names)")
    datamodule = run_datamodule(run_dir) if run_dir is not None and gene_ids.gene_names is None else None
    return CellChoice(cells, every, run_dir, gene_names(model, datamodule, gene_ids.gene_names))
