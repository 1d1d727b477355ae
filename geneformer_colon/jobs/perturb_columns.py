"""What ``perturb`` perturbs, one *column* of its outputs each: single genes, gene sets (``--gene-set FILE``, every set
of ``--gene-sets FILE.gmt``), every K genes of a list at once (``--combos K``), an anchor gene with each other gene
(``--anchor-gene G``); and what a user can weigh the perturbation against, per column, from the cells alone:

- ``cells_expressing``: how many of the chosen cells hold the gene (a set: any of its genes; a combination: all);
- ``log2fc_expressing``: log2 of the share of goal-state cells holding it over the share of the chosen (start-state)
  cells holding it (each share with half a cell added, so a gene no cell holds is finite);
- a gene set's ``set_size`` (its genes in the vocabulary) and ``set_expressed`` (those held by any chosen cell).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geneformer_colon.common.errors import InputError
from geneformer_colon.data.gmt import gene_sets_of
from geneformer_colon.jobs.cell_choice import CellSet, GeneNames, read_gene_list
from geneformer_colon.model.perturbations import anchored_pairs, combinations


@dataclass(frozen=True)
class Columns:
    """What is perturbed: one entry a single gene (one token) or a group (several), with its name and its rule
    (``model.perturbations``: ``set``, ``combo``, ``anchored``; a single gene is a one-gene ``set``)."""

    names: list[str]
    tokens: list[np.ndarray]
    symbols: list[str]
    sets: list[bool]
    rules: list[str] = field(default_factory=list)
    set_sizes: dict[int, int] = field(default_factory=dict)  # a gene set's column: its genes in the vocabulary

    def __post_init__(self) -> None:
        self.rules.extend(["set"] * (len(self.names) - len(self.rules)))

    def __len__(self) -> int:
        return len(self.names)

    def add(self, name: str, tokens: np.ndarray, symbol: str, rule: str = "set", set_size: bool = False) -> None:
        """One more column of several genes."""
        if set_size:
            self.set_sizes[len(self.names)] = len(tokens)
        self.names.append(name)
        self.tokens.append(np.asarray(tokens, dtype=np.int64))
        self.symbols.append(symbol)
        self.sets.append(True)
        self.rules.append(rule)

    @property
    def single(self) -> np.ndarray:
        """The indices of the single-gene columns."""
        return np.flatnonzero(~np.asarray(self.sets, dtype=bool))

    @property
    def single_tokens(self) -> np.ndarray:
        return np.array([self.tokens[i][0] for i in self.single], dtype=np.int64)


def cell_gene_tokens(cells: CellSet, framed: bool) -> list[np.ndarray]:
    """Each cell's gene tokens (``<cls>``/``<eos>`` left out), unique."""
    head = 1 if framed else 0
    return [np.unique(cells.tokens.cell_tokens(int(row))[head: cells.tokens.lengths[row] - head]) for row in cells.rows]


def expressed_genes(cells: CellSet, min_cells: int, framed: bool) -> np.ndarray:
    """Token ids of the genes expressed in at least ``min_cells`` of the cells, most frequent first."""
    genes = cell_gene_tokens(cells, framed)
    seen = np.concatenate(genes) if genes else np.zeros(0, np.int64)
    tokens, counts = np.unique(seen, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return tokens[order][counts[order] >= min_cells].astype(np.int64)


@dataclass(frozen=True)
class Combining:
    """``--combos K`` (K >= 2 genes of the ``--genes`` list at once) and ``--anchor-gene G``."""

    combos: int | None = None
    anchor: str | None = None

    def check(self, genes: str | None) -> None:
        """One line before anything is read: combinations need a list, and a size of at least two."""
        if self.combos is not None:
            if self.combos < 2:
                raise InputError(f"--combos {self.combos}: give the number of genes perturbed at once, 2 or more "
                                 "(--combos 2: every pair of the --genes list)")
            if genes in (None, "all"):
                raise InputError(f"--combos {self.combos}: needs a list of genes to combine; give --genes GENE,... "
                                 "or --genes FILE")
            if self.anchor is not None:
                raise InputError("--combos and --anchor-gene: give one; --anchor-gene pairs the anchor with each "
                                 "other gene, --combos every group of the --genes list")


def choose_columns(names: GeneNames, cells: CellSet, genes: str | None, gene_sets: Sequence[str], min_cells: int,
                   framed: bool, gmt: Sequence[str] = (), combining: Combining = Combining()) -> Columns:
    """The single genes (``--genes all`` or a list/file), or their combinations (``combining``), and the gene sets
    (``--gene-set FILE``, ``--gene-sets FILE.gmt``) to perturb."""
    if genes == "all":
        tokens = expressed_genes(cells, min_cells, framed)
        if len(tokens) == 0:
            raise InputError(f"--genes all --min-cells {min_cells}: no gene is expressed in {min_cells} of the "
                             f"{len(cells.rows)} chosen cells; lower --min-cells or choose more cells")
    elif genes:
        tokens = names.tokens_of(read_gene_list(genes), f"--genes {genes}")
    else:
        tokens = np.zeros(0, np.int64)
    if combining.anchor is not None:
        anchor = names.tokens_of([combining.anchor], f"--anchor-gene {combining.anchor}")[0]
        columns = grouped_columns(names, anchored_pairs(anchor, tokens), "anchored")
    elif combining.combos is not None:
        if combining.combos > len(tokens):
            raise InputError(f"--combos {combining.combos}: the --genes list holds {len(tokens)} genes; give at least "
                             f"{combining.combos}")
        columns = grouped_columns(names, combinations(tokens, combining.combos), "combo")
    else:
        ids = list(names.ids(tokens))
        columns = Columns(ids, [np.array([token]) for token in tokens], names.symbols(ids), [False] * len(ids))
    for gene_set in gene_sets:
        members = names.tokens_of(read_gene_list(gene_set), f"--gene-set {gene_set}")
        columns.add(f"set:{Path(gene_set).stem}", members, f"{len(members)} genes", set_size=True)
    for path in gmt:
        known = set(names.token_of) | set(names.id_of_symbol)
        for gene_set in gene_sets_of(path, known.__contains__):
            members = names.tokens_of(list(gene_set.genes), f"{path} set {gene_set.name}")
            columns.add(f"set:{gene_set.name}", members, f"{len(members)} genes", set_size=True)
    if not len(columns):
        raise InputError("nothing to perturb: give --genes all, --genes GENE,... or --gene-set FILE")
    return columns


def grouped_columns(names: GeneNames, groups: list[tuple[int, ...]], rule: str) -> Columns:
    """One column a group of genes: named ``<id>+<id>``, symbols ``<symbol>+<symbol>``."""
    columns = Columns([], [], [], [])
    for group in groups:
        ids = list(names.ids(np.array(group)))
        symbols = names.symbols(ids)
        columns.add("+".join(ids), np.array(group), "+".join(symbols) if all(symbols) else "", rule)
    return columns


def column_annotations(columns: Columns, cells: CellSet, goal_cells: CellSet | None, framed: bool
                       ) -> dict[str, np.ndarray]:
    """Per column, what the cells alone say (see the module docstring)."""
    start = holding(columns, cell_gene_tokens(cells, framed))
    annotations = {"cells_expressing": start.sum(0).astype(np.int64)}
    if goal_cells is not None and len(goal_cells.rows):
        goal = holding(columns, cell_gene_tokens(goal_cells, framed))
        goal_share = (goal.sum(0) + 0.5) / (len(goal_cells.rows) + 1.0)
        start_share = (start.sum(0) + 0.5) / (len(cells.rows) + 1.0)
        annotations["log2fc_expressing"] = np.log2(goal_share / start_share)
    if columns.set_sizes:
        expressed = np.unique(np.concatenate(cell_gene_tokens(cells, framed)))
        size = np.full(len(columns), np.nan)
        held = np.full(len(columns), np.nan)
        for column, n in columns.set_sizes.items():
            size[column] = n
            held[column] = np.isin(columns.tokens[column], expressed).sum()
        annotations["set_size"], annotations["set_expressed"] = size, held
    return annotations


def holding(columns: Columns, genes: list[np.ndarray]) -> np.ndarray:
    """cells x columns: whether the cell holds the column's gene (a set: any of its genes; a combination: all)."""
    width = max((len(tokens) for tokens in columns.tokens), default=1)
    table = np.zeros((len(columns), width), dtype=np.int64)
    valid = np.zeros((len(columns), width), dtype=bool)
    for column, tokens in enumerate(columns.tokens):
        table[column, : len(tokens)], valid[column, : len(tokens)] = tokens, True
    every = np.array([rule != "set" for rule in columns.rules], dtype=bool)
    size = int(max(table.max(initial=0), *(present.max(initial=0) for present in genes), 0)) + 1
    mask = np.zeros(size, dtype=bool)
    held = np.zeros((len(genes), len(columns)), dtype=bool)
    for cell, present in enumerate(genes):
        mask[present] = True
        found = mask[table]
        held[cell] = np.where(every, (found | ~valid).all(1), (found & valid).any(1))
        mask[present] = False
    return held
