"""The perturbations of a set of cells through the model (``perturb``'s engine): a cell's variants built by one
gather where they are single genes (``model.perturbations`` for the rest), batched with the cell's own unperturbed
pass and never with another cell's, so a cell's numbers are the same in whichever shard or chunk it is done.

Measured per cell and column: the change of every class probability, and the shift of the pooled embedding toward
the goal state, cos(perturbed, goal centroid) - cos(original, goal centroid); with ``network``, the gene-network
shifts of ``perturb_network``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np

from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.data.dictionaries import FRAME_TOKENS
from geneformer_colon.data.token_rows import pad_tokens
from geneformer_colon.jobs.cell_choice import CellSet
from geneformer_colon.jobs.perturb_columns import Columns
from geneformer_colon.jobs.perturb_network import NETWORK_KEYS, captured_hidden, row_shifts
from geneformer_colon.model.perturbations import inserted_variants, perturbed_tokens, single_gene_variants

NOT_EXPRESSED = 1.0  # the relative rank of a gene a cell lacks (overexpression inserts it)


Variants = tuple[list[np.ndarray], np.ndarray, np.ndarray]  # blocks of token rows, their columns, the genes' ranks


class Perturber:
    """Runs every perturbation of a set of cells through the model, a cell at a time (see the module docstring)."""

    def __init__(self, model: TrainedClassifier, kind: str, centroid: np.ndarray, batch_size: int = 64,
                 device: str = "cpu", insert_absent: bool = False, network: bool = False,
                 max_tokens: int | None = None) -> None:
        self.model, self.kind, self.batch_size, self.device, self.network = model, kind, batch_size, device, network
        self.max_tokens = max_tokens
        self.centroid = centroid / max(float(np.linalg.norm(centroid)), 1e-12)
        self.insert_absent = insert_absent and kind == "overexpress"
        self.framed = bool(FRAME_TOKENS[model.settings.model_version])
        self.head = 1 if self.framed else 0
        self.input_size = model.settings.resolved_input_size
        self.lookup = np.full(len(model.dictionaries.token), -1, dtype=np.int64)  # scratch: token -> rank, else -1

    def genes_of(self, cell: np.ndarray) -> np.ndarray:
        """A cell's gene tokens, without ``<cls>``/``<eos>``."""
        return cell[self.head : len(cell) - self.head]

    def cell_variants(self, cell: np.ndarray, columns: Columns) -> Variants:
        """A cell's variants (one row a perturbed column), their columns and the genes' relative ranks (a group:
        the mean of its members the cell holds)."""
        genes = self.genes_of(cell)
        self.lookup[genes] = np.arange(len(genes))
        try:
            rank_of = self.lookup[columns.single_tokens]
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
                variant = perturbed_tokens(cell, columns.tokens[column], self.kind, self.input_size, self.framed,
                                           columns.rules[column])
                if variant is None:
                    continue
                blocks.append(variant[None, :])
                chosen.append(np.array([column]))
                where = self.lookup[columns.tokens[column]]
                where = where[where >= 0]
                ranks.append(np.array([where.mean() / len(genes) if len(where) else NOT_EXPRESSED]))
        finally:
            self.lookup[genes] = -1
        return ([block for block in blocks if len(block)], np.concatenate(chosen).astype(np.int64),
                np.concatenate(ranks).astype(np.float32))

    def count(self, cells: CellSet, columns: Columns) -> np.ndarray:
        """How many perturbations :meth:`run` makes in each cell."""
        return np.array([len(self.cell_variants(np.asarray(cells.tokens.cell_tokens(int(row)), np.int64), columns)[1])
                         for row in cells.rows], dtype=np.int64)

    def batches(self, cell: np.ndarray, columns: Columns) -> Iterator[tuple[list[np.ndarray], np.ndarray, np.ndarray]]:
        """A cell's unperturbed tokens, then its variants, in batches of ``batch_size`` rows, fewer where
        ``max_tokens`` holds fewer rows of the cell's length (the last batch fewer):
        (blocks of token rows, columns, ranks; the unperturbed row has column -1). Never two cells in a batch: a
        cell's numbers do not depend on the cells beside it (shards merge exactly)."""
        blocks, chosen, ranks = self.cell_variants(cell, columns)
        blocks = [cell[None, :], *blocks]
        chosen, ranks = np.concatenate([[-1], chosen]), np.concatenate([[np.nan], ranks])
        block_of = np.concatenate([np.full(len(block), index) for index, block in enumerate(blocks)])
        within = np.concatenate([np.arange(len(block)) for block in blocks])
        rows = self.batch_size if self.max_tokens is None else max(1, min(self.batch_size,
                                                                         self.max_tokens // (len(cell) + 1)))
        for start in range(0, len(chosen), rows):
            part = slice(start, start + rows)
            parts = [blocks[block][within[part][block_of[part] == block]] for block in np.unique(block_of[part])]
            yield parts, chosen[part], ranks[part].astype(np.float32)

    def run(self, cells: CellSet, positions: np.ndarray, columns: Columns, progress: Callable[[int], None] | None = None
            ) -> dict[str, np.ndarray]:
        """Every perturbation of the cells at ``positions`` (of ``cells``), each cell's batches after the other; the
        pairs' cells, columns, ranks, change of every class probability and embedding shift, and each cell's
        unperturbed probabilities; with ``network``, the gene-network shifts (``net_*``: ``perturb_network``)."""
        parts: list[tuple[np.ndarray, ...]] = []
        network: list[tuple[np.ndarray, ...]] = []
        base = np.zeros((len(positions), len(self.model.class_names)), dtype=np.float64)
        with captured_hidden(self.model) if self.network else contextlib.nullcontext([]) as hidden:
            for index, position in enumerate(positions):
                cell = np.asarray(cells.tokens.cell_tokens(int(cells.rows[position])), dtype=np.int64)
                for blocks, column, rank in self.batches(cell, columns):
                    input_ids, attention_mask = pad_tokens(blocks, self.model.pad_id)
                    probabilities, embeddings = self.model.infer(input_ids, attention_mask, self.device)
                    cosine = cosines(embeddings, self.centroid)
                    states = np.concatenate(hidden) if self.network else None  # a batch halved: its parts
                    hidden.clear()
                    first = int(column[0] == -1)  # the cell's first batch leads with the unperturbed cell
                    if first:
                        base[index], base_cosine, base_states = probabilities[0], cosine[0], states
                    if states is not None:
                        lengths = attention_mask.sum(1).numpy()
                        for row in range(first, len(column)):
                            genes, shift = row_shifts(cell, base_states[0], input_ids[row, : lengths[row]].numpy(),
                                                      states[row], columns.tokens[column[row]], self.head)
                            network.append((np.full(len(genes), position), np.full(len(genes), column[row]), genes,
                                            shift, np.full(len(genes), rank[row], np.float32)))
                    parts.append((np.full(len(column) - first, position), column[first:], rank[first:],
                                  (probabilities[first:] - base[index]).astype(np.float32),
                                  (cosine[first:] - base_cosine).astype(np.float32)))
                    if progress is not None:
                        progress(len(column) - first)
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32),
                 np.zeros((0, base.shape[1]), np.float32), np.zeros(0, np.float32))
        done = {name: np.concatenate(values) for name, values in zip(("cell", "column", "rank", "delta", "shift"),
                                                                      zip(empty, *parts))}
        if self.network:
            empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32),
                     np.zeros(0, np.float32))
            done.update({name: np.concatenate(values) for name, values in
                         zip(NETWORK_KEYS, zip(empty, *network))})
        return {**done, "base_cells": np.asarray(positions, dtype=np.int64), "base_probabilities": base}


def cosines(embeddings: np.ndarray, unit: np.ndarray) -> np.ndarray:
    norms = np.maximum(np.linalg.norm(embeddings, axis=1), 1e-12)
    return (embeddings @ unit) / norms
