"""In-silico perturbation: ``geneformer-colon perturb RUN_DIR|EXPORT_DIR [INPUT.h5ad] --goal CLASS``.

Geneformer's perturbations of a cell's rank-value encoding (its gene tokens, most over-expressed
first; V2 frames them with ``<cls>`` and ``<eos>``):

- ``delete``: the gene's token removed, the genes after it move up one place; a cell without the
  gene has nothing to delete and is not counted for it;
- ``overexpress``: the gene's token moved to the front (after ``<cls>``); a gene the cell lacks
  (named in a list or a set, not with ``--genes all``) is inserted there, and a cell then longer
  than the input size loses its last gene (V2 keeps ``<eos>``), as upstream's ``overexpress_tokens``.

A gene set is perturbed at once (all its genes deleted, or put at the front in the set's order).
Each perturbed cell goes through the model once; the unperturbed pass once per cell. Measured per
cell and gene: the change of every class probability, and the shift of the pooled embedding toward
the goal state, cos(perturbed, goal centroid) - cos(original, goal centroid).

Speed: a cell's single-gene variants are built as one index array (no Python per variant) and all
have one length (delete: the cell's length - 1, overexpress: the cell's), so they stack without
padding; cells are taken in order of length, so a batch that spans two cells pads little. The model
runs under ``torch.inference_mode`` (bf16 autocast on GPUs, SDPA attention) and stops at the pooled
embedding and the head.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.common.errors import InputError
from geneformer_colon.common.output_folder import output_folder
from geneformer_colon.data.dictionaries import FRAME_TOKENS
from geneformer_colon.data.token_rows import pad_tokens
from geneformer_colon.jobs.cell_choice import (
    CellSet,
    GeneNames,
    check_cell_counts,
    goal_centroid,
    read_gene_list,
    select_cells,
)
from geneformer_colon.jobs.predict import GeneIds
from geneformer_colon.report.gene_effects import GENE_OUTPUTS, GeneEffects, write_gene_outputs

log = logging.getLogger(__name__)

PERTURBATIONS = ("delete", "overexpress")
NOT_EXPRESSED = 1.0  # the relative rank of a gene a cell lacks (overexpression inserts it)


def perturbed_tokens(cell: np.ndarray, genes: Sequence[int], kind: str, input_size: int, framed: bool
                     ) -> np.ndarray | None:
    """One cell's tokens with ``genes`` (token ids) deleted or overexpressed, by Geneformer's definitions (see the
    module docstring); None when deleting genes none of which the cell has."""
    cell = np.asarray(cell, dtype=np.int64)
    hit = np.isin(cell, np.asarray(genes, dtype=np.int64))
    if kind == "delete":
        return cell[~hit] if hit.any() else None
    rest = cell[~hit]
    head = 1 if framed else 0
    moved = np.concatenate([rest[:head], np.asarray(genes, dtype=np.int64), rest[head:]])
    if len(moved) > input_size:
        moved = np.concatenate([moved[: input_size - 1], moved[-1:]]) if framed else moved[:input_size]
    return moved


def single_gene_variants(cell: np.ndarray, positions: np.ndarray, kind: str, head: int) -> np.ndarray:
    """The variants of a cell for genes it has at token ``positions``, one row each, by one gather (what
    :func:`perturbed_tokens` gives gene by gene)."""
    length = len(cell)
    if kind == "delete":
        j = np.arange(length - 1)
        return cell[j[None, :] + (j[None, :] >= positions[:, None])]
    j = np.arange(length)
    shifted = j - (j > head)  # the index in the cell without the moved gene
    index = shifted[None, :] + (shifted[None, :] >= positions[:, None])
    index[:, j < head] = j[j < head]
    index[:, head] = positions
    return cell[index]


def inserted_variants(cell: np.ndarray, tokens: np.ndarray, head: int, input_size: int, framed: bool) -> np.ndarray:
    """The variants of a cell with each of ``tokens`` (genes it lacks) inserted at the front, truncated."""
    base = np.concatenate([cell[:head], [0], cell[head:]])
    if len(base) > input_size:
        base = np.concatenate([base[: input_size - 1], base[-1:]]) if framed else base[:input_size]
    variants = np.repeat(base[None, :], len(tokens), axis=0)
    variants[:, head] = tokens
    return variants


@dataclass(frozen=True)
class Columns:
    """What is perturbed: one entry a single gene (one token) or a gene set (several), with its name."""

    names: list[str]
    tokens: list[np.ndarray]
    symbols: list[str]
    sets: list[bool]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def single(self) -> np.ndarray:
        """The indices of the single-gene columns."""
        return np.flatnonzero(~np.asarray(self.sets, dtype=bool))

    @property
    def single_tokens(self) -> np.ndarray:
        return np.array([self.tokens[i][0] for i in self.single], dtype=np.int64)


@dataclass
class Perturbations:
    """One entry a perturbed (cell, column): the cell (index in the cell set), the column, the gene's relative rank in
    the cell before (0 = top; 1 = not expressed), the change of every class probability, the embedding shift."""

    cell: np.ndarray
    column: np.ndarray
    rank: np.ndarray
    delta: np.ndarray
    shift: np.ndarray


Variants = tuple[list[np.ndarray], np.ndarray, np.ndarray]  # blocks of token rows, their columns, the genes' ranks


class Perturber:
    """Runs every perturbation of a set of cells through the model in batches (see the module docstring)."""

    def __init__(self, model: TrainedClassifier, kind: str, centroid: np.ndarray, batch_size: int = 64,
                 device: str = "cpu", insert_absent: bool = False) -> None:
        self.model, self.kind, self.batch_size, self.device = model, kind, batch_size, device
        self.centroid = centroid / max(float(np.linalg.norm(centroid)), 1e-12)
        self.insert_absent = insert_absent and kind == "overexpress"
        self.framed = bool(FRAME_TOKENS[model.settings.model_version])
        self.head = 1 if self.framed else 0
        self.input_size = model.settings.resolved_input_size

    def genes_of(self, cell: np.ndarray) -> np.ndarray:
        """A cell's gene tokens, without ``<cls>``/``<eos>``."""
        return cell[self.head : len(cell) - self.head]

    def cell_variants(self, cell: np.ndarray, columns: Columns, lookup: np.ndarray) -> Variants:
        """A cell's variants (one row a perturbed column), their columns and the genes' relative ranks.
        ``lookup``: -1 for every token id (a scratch array, left as it was found)."""
        genes = self.genes_of(cell)
        lookup[genes] = np.arange(len(genes))
        rank_of = lookup[columns.single_tokens]
        lookup[genes] = -1
        present = np.flatnonzero(rank_of >= 0)
        blocks = [single_gene_variants(cell, rank_of[present] + self.head, self.kind, self.head)]
        chosen, ranks = [columns.single[present]], [rank_of[present] / len(genes)]
        if self.insert_absent:
            absent = np.flatnonzero(rank_of < 0)
            blocks.append(inserted_variants(cell, columns.single_tokens[absent], self.head, self.input_size,
                                            self.framed))
            chosen.append(columns.single[absent])
            ranks.append(np.full(len(absent), NOT_EXPRESSED))
        for column in np.flatnonzero(columns.sets):
            variant = perturbed_tokens(cell, columns.tokens[column], self.kind, self.input_size, self.framed)
            if variant is None:
                continue
            blocks.append(variant[None, :])
            chosen.append(np.array([column]))
            where = np.flatnonzero(np.isin(genes, columns.tokens[column]))
            ranks.append(np.array([where.mean() / len(genes) if len(where) else NOT_EXPRESSED]))
        return ([block for block in blocks if len(block)], np.concatenate(chosen).astype(np.int64),
                np.concatenate(ranks).astype(np.float32))

    def count(self, cells: CellSet, columns: Columns) -> int:
        """How many perturbations :meth:`run` makes (for the progress bar)."""
        total = 0
        for row in cells.rows:
            genes = self.genes_of(np.asarray(cells.tokens.cell_tokens(int(row))))
            total += len(columns.single) if self.insert_absent else int(np.isin(columns.single_tokens, genes).sum())
            total += sum(self.kind == "overexpress" or bool(np.isin(columns.tokens[i], genes).any())
                         for i in np.flatnonzero(columns.sets))
        return total

    def batches(self, cells: CellSet, columns: Columns) -> Iterator[tuple[list[np.ndarray], np.ndarray, np.ndarray,
                                                                          np.ndarray]]:
        """Batches of ``batch_size`` variants (the last fewer): (blocks of token rows, their cells, columns, ranks);
        cells in order of length, longest first."""
        lookup = np.full(len(self.model.dictionaries.token), -1, dtype=np.int64)
        pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        size = 0
        for index in np.argsort(-cells.tokens.lengths[cells.rows], kind="stable"):
            cell = np.asarray(cells.tokens.cell_tokens(int(cells.rows[index])), dtype=np.int64)
            blocks, chosen, ranks = self.cell_variants(cell, columns, lookup)
            offset = 0
            for block in blocks:
                start = 0
                while start < len(block):
                    part = block[start : start + self.batch_size - size]
                    rows = slice(offset + start, offset + start + len(part))
                    pending.append((part, np.full(len(part), index), chosen[rows], ranks[rows]))
                    size += len(part)
                    start += len(part)
                    if size == self.batch_size:
                        yield self._gathered(pending)
                        pending, size = [], 0
                offset += len(block)
        if pending:
            yield self._gathered(pending)

    @staticmethod
    def _gathered(pending: list[tuple[np.ndarray, ...]]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray,
                                                                   np.ndarray]:
        blocks, cells, chosen, ranks = zip(*pending)
        return list(blocks), np.concatenate(cells), np.concatenate(chosen), np.concatenate(ranks)

    def run(self, cells: CellSet, columns: Columns, base_probabilities: np.ndarray, base_embeddings: np.ndarray,
            progress: Progress | None = None) -> Perturbations:
        """Every perturbation of every cell, against the cells' unperturbed probabilities and embeddings."""
        base_cosine = cosines(base_embeddings, self.centroid)
        task = progress.add_task("perturbing", total=self.count(cells, columns)) if progress is not None else None
        parts: list[tuple[np.ndarray, ...]] = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32),
                                                np.zeros((0, base_probabilities.shape[1]), np.float32),
                                                np.zeros(0, np.float32))]
        for blocks, cell, column, rank in self.batches(cells, columns):
            probabilities, embeddings = self.model.infer(*pad_tokens(blocks, self.model.pad_id), self.device)
            parts.append((cell, column, rank, (probabilities - base_probabilities[cell]).astype(np.float32),
                          (cosines(embeddings, self.centroid) - base_cosine[cell]).astype(np.float32)))
            if task is not None:
                progress.advance(task, len(cell))
        return Perturbations(*(np.concatenate(column) for column in zip(*parts)))


def cosines(embeddings: np.ndarray, unit: np.ndarray) -> np.ndarray:
    norms = np.maximum(np.linalg.norm(embeddings, axis=1), 1e-12)
    return (embeddings @ unit) / norms


def progress_bar() -> Progress:
    """cells x genes done, the rate and the expected time left."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("cell x gene"),
                    TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), transient=True)


def expressed_genes(cells: CellSet, min_cells: int, framed: bool) -> np.ndarray:
    """Token ids of the genes expressed in at least ``min_cells`` of the cells, most frequent first."""
    head = 1 if framed else 0
    seen = np.concatenate([np.unique(cells.tokens.cell_tokens(int(row))[head : cells.tokens.lengths[row] - head])
                           for row in cells.rows]) if len(cells.rows) else np.zeros(0, np.int64)
    tokens, counts = np.unique(seen, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return tokens[order][counts[order] >= min_cells].astype(np.int64)


def choose_columns(names: GeneNames, cells: CellSet, genes: str | None, gene_sets: Sequence[str], min_cells: int,
                   framed: bool) -> Columns:
    """The single genes (``--genes all`` or a list/file) and the gene sets (``--gene-set FILE``) to perturb."""
    if genes == "all":
        tokens = expressed_genes(cells, min_cells, framed)
        if len(tokens) == 0:
            raise InputError(f"--genes all --min-cells {min_cells}: no gene is expressed in {min_cells} of the "
                             f"{len(cells.rows)} chosen cells; lower --min-cells or choose more cells")
    elif genes:
        tokens = names.tokens_of(read_gene_list(genes), f"--genes {genes}")
    else:
        tokens = np.zeros(0, np.int64)
    ids = list(names.ids(tokens))
    columns = Columns(ids, [np.array([token]) for token in tokens], names.symbols(ids), [False] * len(ids))
    for gene_set in gene_sets:
        members = names.tokens_of(read_gene_list(gene_set), f"--gene-set {gene_set}")
        columns.names.append(f"set:{Path(gene_set).stem}")
        columns.tokens.append(members)
        columns.symbols.append(f"{len(members)} genes")
        columns.sets.append(True)
    if not len(columns):
        raise InputError("nothing to perturb: give --genes all, --genes GENE,... or --gene-set FILE")
    return columns


def perturb(
    model_path: str | Path,
    goal: str,
    input_path: str | Path | None = None,
    kind: str = "delete",
    where: Sequence[str] = (),
    genes: str | None = "all",
    gene_sets: Sequence[str] = (),
    min_cells: int = 10,
    max_cells: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    name: str | None = None,
    label_key: str = "label",
    gene_ids: GeneIds = GeneIds(),
    layer: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    fold: str | None = None,
) -> Path:
    """Perturb the chosen cells' genes toward ``goal``; write genes.csv, genes.md, shifts.h5ad and plots (see the
    module docstring); return the output folder. A CV run: the ensemble of its folds, or its ``fold``."""
    model = TrainedClassifier.load(model_path, fold)
    model_path = fold_path(model_path, fold)
    if goal not in model.class_names:
        raise InputError(f"--goal {goal}: not a class of the model {model.class_names}; choose one of those")
    if kind not in PERTURBATIONS:
        raise InputError(f"--perturb {kind}: unknown; use one of {', '.join(PERTURBATIONS)}")
    check_cell_counts(max_cells, min_cells)


    def goal_cells(obs: pd.DataFrame) -> np.ndarray:
        return (obs[label_key].astype(str) == goal).to_numpy() if label_key in obs.columns else np.zeros(len(obs), bool)

    out = Path(out_dir) if out_dir is not None else default_out(model_path, input_path, "perturb") / (
        name or default_name(f"{kind}_to_{goal}", where))
    with output_folder(out, "perturb", (*GENE_OUTPUTS, "shifts.h5ad")) as written:
        choice = select_cells(model, model_path, input_path, where, max_cells, seed, gene_ids, layer, also=goal_cells)
        cells, source_names = choice.cells, choice.names
        centroid, centroid_from = goal_centroid(model, choice.every, label_key, goal, choice.run_dir, batch_size,
                                                device)
        framed = bool(FRAME_TOKENS[model.settings.model_version])
        columns = choose_columns(source_names, cells, genes, gene_sets, min_cells, framed)
        started = time.perf_counter()
        base_probabilities, base_embeddings = model.apply(cells.tokens, cells.rows, batch_size, device=device)
        perturber = Perturber(model, kind, centroid, batch_size, device, insert_absent=genes not in (None, "all"))
        with progress_bar() if progress else contextlib.nullcontext() as bar:
            done = perturber.run(cells, columns, base_probabilities, base_embeddings, bar)
        seconds = time.perf_counter() - started
        goal_index = model.class_names.index(goal)
        obs = cells.obs.assign(predicted=np.asarray(model.class_names)[base_probabilities.argmax(1)],
                               **{f"prob_{goal}": base_probabilities[:, goal_index]})
        effects = GeneEffects(names=columns.names, symbols=columns.symbols, cell=done.cell, column=done.column,
                              rank=done.rank, values={f"delta_{goal}": done.delta[:, goal_index],
                                                      "embedding_shift": done.shift,
                                                      **{f"delta_{c}": done.delta[:, i]
                                                         for i, c in enumerate(model.class_names) if c != goal}})
        settings = {"command": "perturb", "model": str(model_path), "input": str(input_path or "run val/test cells"),
                    "perturb": kind, "goal": goal, "where": list(where), "genes": genes, "gene_sets": list(gene_sets),
                    "min_cells": min_cells, "max_cells": max_cells, "seed": seed, "cells": len(cells.rows),
                    "columns": len(columns), "perturbations": len(done.cell), "seconds": round(seconds, 2),
                    "per_second": round(len(done.cell) / max(seconds, 1e-9), 1), "goal_centroid": centroid_from,
                    "device": device}
        write_gene_outputs(written, effects, obs, settings, matrix_name="shifts.h5ad",
                           title=f"{kind} toward {goal}: change of P({goal})", groups=("donor",))
    log.info("%d perturbations of %d cells x %d genes in %.1f s (%.0f a second): %s", len(done.cell), len(cells.rows),
             len(columns), seconds, settings["per_second"], out)
    return out


def fold_path(model_path: str | Path, fold: str | None) -> Path:
    """The model's own directory: a CV run's (or ensemble export's) fold, ``folds/<fold>``, with ``fold``."""
    return Path(model_path) / "folds" / fold if fold is not None else Path(model_path)


def default_out(model_path: str | Path, input_path: str | Path | None, verb: str) -> Path:
    """``<run dir>/<verb>/`` for the run's cells, ``<input stem>_<verb>/`` beside an input file."""
    if input_path is None:
        return Path(model_path) / verb
    return Path(input_path).with_name(f"{Path(input_path).stem}_{verb}")


def default_name(head: str, where: Sequence[str]) -> str:
    """An output folder's name from what was done and the cells chosen (no '/' or space), e.g.
    ``delete_to_Normal_label=Tumor_donor=KUL01``."""
    return "_".join([head, *where]).replace("/", "-").replace(" ", "-")
