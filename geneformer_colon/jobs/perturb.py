"""In-silico perturbation: ``geneformer-colon perturb RUN_DIR|EXPORT_DIR [INPUT.h5ad] --goal CLASS``.

Geneformer's perturbations of a cell's rank-value encoding (``model.perturbations``: a gene, a set,
K genes of a list at once, an anchor gene with each other gene; deleted or overexpressed). Each
perturbed cell goes through the model once; the unperturbed pass once per cell. Measured per cell
and column: the change of every class probability, and the shift of the pooled embedding toward
the goal state, cos(perturbed, goal centroid) - cos(original, goal centroid).

Speed: a cell's single-gene variants are built as one index array (no Python per variant) and all
have one length (delete: the cell's length - 1, overexpress: the cell's), so they stack without
padding; a batch holds one cell's variants only, so a cell's numbers are the same in whichever
shard it is computed (``perturb_shards``: shards, chunks, resume, merge, devices). The model runs
under ``torch.inference_mode`` (bf16 autocast on GPUs, SDPA attention) and stops at the pooled
embedding and the head.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import remove
from geneformer_colon.common.output_folder import output_folder
from geneformer_colon.data.dictionaries import FRAME_TOKENS
from geneformer_colon.data.token_rows import pad_tokens
from geneformer_colon.jobs.cell_choice import CellSet, check_cell_counts, goal_centroid, select_cells
from geneformer_colon.jobs.perturb_columns import (
    Columns,
    Combining,
    cell_gene_tokens,
    choose_columns,
    column_annotations,
)
from geneformer_colon.jobs.perturb_network import (
    NETWORK_KEYS,
    NETWORK_OUTPUTS,
    aggregate,
    captured_hidden,
    check_network,
    row_shifts,
    write_network,
)
from geneformer_colon.jobs.perturb_shards import (
    Merged,
    Plan,
    digest,
    is_complete,
    merge_shards,
    merged_out,
    run_on_devices,
    run_shard,
    shard_dir,
    share,
    sibling_shards,
)
from geneformer_colon.jobs.predict import GeneIds
from geneformer_colon.model.perturbations import inserted_variants, perturbed_tokens, single_gene_variants
from geneformer_colon.report.gene_effects import GENE_OUTPUTS, GeneEffects, write_gene_outputs

log = logging.getLogger(__name__)

PERTURBATIONS = ("delete", "overexpress")
NOT_EXPRESSED = 1.0  # the relative rank of a gene a cell lacks (overexpression inserts it)
TIMING = ("seconds", "per_second", "devices", "shards")  # settings that differ between equal results
OWN_NAMES = (*GENE_OUTPUTS, "shifts.h5ad", *NETWORK_OUTPUTS)


Variants = tuple[list[np.ndarray], np.ndarray, np.ndarray]  # blocks of token rows, their columns, the genes' ranks


class Perturber:
    """Runs every perturbation of a set of cells through the model, a cell at a time (see the module docstring)."""

    def __init__(self, model: TrainedClassifier, kind: str, centroid: np.ndarray, batch_size: int = 64,
                 device: str = "cpu", insert_absent: bool = False, network: bool = False) -> None:
        self.model, self.kind, self.batch_size, self.device, self.network = model, kind, batch_size, device, network
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
        """A cell's unperturbed tokens, then its variants, in batches of ``batch_size`` rows (the last fewer):
        (blocks of token rows, columns, ranks; the unperturbed row has column -1). Never two cells in a batch: a
        cell's numbers do not depend on the cells beside it (shards merge exactly)."""
        blocks, chosen, ranks = self.cell_variants(cell, columns)
        blocks = [cell[None, :], *blocks]
        chosen, ranks = np.concatenate([[-1], chosen]), np.concatenate([[np.nan], ranks])
        block_of = np.concatenate([np.full(len(block), index) for index, block in enumerate(blocks)])
        within = np.concatenate([np.arange(len(block)) for block in blocks])
        for start in range(0, len(chosen), self.batch_size):
            part = slice(start, start + self.batch_size)
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
                    states = hidden.pop() if self.network else None
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


def progress_bar() -> Progress:
    """cells x genes done, the rate and the expected time left."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("cell x gene"),
                    TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), transient=True)


@dataclass(frozen=True)
class Asked:
    """What to perturb, in which cells, toward which goal: every setting that fixes the result."""

    goal: str
    input_path: str | Path | None = None
    kind: str = "delete"
    where: Sequence[str] = ()
    genes: str | None = "all"
    gene_sets: Sequence[str] = ()
    gmt: Sequence[str] = ()
    combining: Combining = Combining()
    min_cells: int = 10
    max_cells: int | None = None
    seed: int = 0
    label_key: str = "label"
    gene_ids: GeneIds = GeneIds()
    layer: str | None = None
    batch_size: int = 64
    fold: str | None = None
    emb_mode: str = "cell"
    top_k: int = 20

    def check(self) -> None:
        """Everything that needs no model or data, one line each."""
        if self.kind not in PERTURBATIONS:
            raise InputError(f"--perturb {self.kind}: unknown; use one of {', '.join(PERTURBATIONS)}")
        check_cell_counts(self.max_cells, self.min_cells)
        self.combining.check(self.genes)


def plan_job(model_path: str | Path, asked: Asked, shard: tuple[int, int], chunk_cells: int, device: str
             ) -> tuple[TrainedClassifier, Plan, CellSet, Columns, np.ndarray, pd.DataFrame]:
    """The model, the shard's plan, the chosen cells, the columns, the goal centroid and the cells' obs."""
    model = TrainedClassifier.load(model_path, asked.fold)
    model_path = fold_path(model_path, asked.fold)
    check_network(model, asked.emb_mode, asked.top_k)
    goal = asked.goal
    if goal not in model.class_names:
        raise InputError(f"--goal {goal}: not a class of the model {model.class_names}; choose one of those")

    def goal_cells(obs: pd.DataFrame) -> np.ndarray:
        label = asked.label_key
        return (obs[label].astype(str) == goal).to_numpy() if label in obs.columns else np.zeros(len(obs), bool)

    choice = select_cells(model, model_path, asked.input_path, asked.where, asked.max_cells, asked.seed,
                          asked.gene_ids, asked.layer, also=goal_cells)
    cells = choice.cells
    framed = bool(FRAME_TOKENS[model.settings.model_version])
    columns = choose_columns(choice.names, cells, asked.genes, asked.gene_sets, asked.min_cells, framed, asked.gmt,
                             asked.combining)
    centroid, centroid_from = goal_centroid(model, choice.every, asked.label_key, goal, choice.run_dir,
                                            asked.batch_size, device)
    perturber = Perturber(model, asked.kind, centroid, asked.batch_size, insert_absent=asked.genes not in (None, "all"))
    costs = perturber.count(cells, columns) * cells.tokens.lengths[cells.rows]
    goal_state = choice.every.subset(goal_cells(choice.every.obs)) if asked.label_key in choice.every.obs else None
    annotations = column_annotations(columns, cells, goal_state, framed)
    identity = {"command": "perturb", "model": str(model_path), "input": str(asked.input_path or "run val/test cells"),
                "perturb": asked.kind, "goal": goal, "where": list(asked.where), "genes": asked.genes,
                "gene_sets": list(asked.gene_sets), "gmt": list(asked.gmt), "combos": asked.combining.combos,
                "anchor_gene": asked.combining.anchor, "min_cells": asked.min_cells, "max_cells": asked.max_cells,
                "seed": asked.seed, "cells": len(cells.rows), "columns": len(columns), "goal_centroid": centroid_from,
                "batch_size": asked.batch_size, "emb_mode": asked.emb_mode, "top_k": asked.top_k,
                "cells_digest": digest(list(cells.obs.index)),
                "columns_digest": digest(columns.names), "centroid_digest": digest(centroid.astype(np.float32))}
    obs = cells.obs.copy()
    named = {"names": list(columns.names), "symbols": list(columns.symbols), "classes": list(model.class_names)}
    if asked.emb_mode == "cell_and_gene":  # the affected genes' names, for the merge, which reads no model
        tokens = np.unique(np.concatenate(cell_gene_tokens(cells, framed)))
        ids = list(choice.names.ids(tokens))
        named.update(gene_tokens=[str(token) for token in tokens], gene_ids=ids, gene_symbols=choice.names.symbols(ids))
    plan = Plan(identity, shard[0], shard[1], share(costs, *shard), chunk_cells, named,
                {name: [float(value) for value in values] for name, values in annotations.items()})
    return model, plan, cells, columns, centroid, obs


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
    gmt: Sequence[str] = (),
    combos: int | None = None,
    anchor_gene: str | None = None,
    shard: tuple[int, int] | None = None,
    resume: bool = False,
    chunk_cells: int = 16,
    devices: Sequence[str] | None = None,
    merge_when_done: bool = True,
    emb_mode: str = "cell",
    top_k: int = 20,
) -> Path:
    """Perturb the chosen cells' genes toward ``goal``; write genes.csv, genes.md, shifts.h5ad and plots (see the
    module docstring); return the output folder. A CV run: the ensemble of its folds, or its ``fold``. ``shard``
    (I, N): only that share of the cells, into ``<out>.shard-I-of-N`` (merged into ``out`` by the last shard to
    finish, with ``merge_when_done``); ``devices``: one worker process a device over as many shards, then merged."""
    asked = Asked(goal, input_path, kind, tuple(where), genes, tuple(gene_sets), tuple(gmt),
                  Combining(combos, anchor_gene), min_cells, max_cells, seed, label_key, gene_ids, layer, batch_size,
                  fold, emb_mode, top_k)
    asked.check()
    if chunk_cells < 1:
        raise InputError(f"--chunk-cells {chunk_cells}: give a number of cells >= 1")
    out = Path(out_dir) if out_dir is not None else default_out(fold_path(model_path, fold), input_path, "perturb") / (
        name or default_name(f"{kind}_to_{goal}", where))
    if devices:
        return perturb_on_devices(model_path, asked, out, list(devices), resume, chunk_cells)
    if shard is not None:
        folder = compute_shard(model_path, asked, out, shard, chunk_cells, device, resume, progress)
        siblings = sibling_shards(folder)
        if merge_when_done and all(is_complete(sibling) for sibling in siblings):
            try:
                return merge_perturb(siblings, out)
            except InputError as error:  # another shard finishing at the same time merges
                if "being written by" not in str(error):
                    raise
                log.info("%s: merged by another shard", out)
        return folder
    with output_folder(out, "perturb", OWN_NAMES) as written:
        folder = compute_shard(model_path, asked, out, (0, 1), chunk_cells, device, resume, progress)
        write_outputs(written, merge_shards([folder]), out)
    remove(folder)
    return out


def compute_shard(model_path: str | Path, asked: Asked, out: Path, shard: tuple[int, int], chunk_cells: int,
                  device: str, resume: bool, progress: bool) -> Path:
    """The shard's chunks computed (those a stopped run left kept, with ``resume``); its folder."""
    model, plan, cells, columns, centroid, obs = plan_job(model_path, asked, shard, chunk_cells, device)
    folder = shard_dir(out, *shard)
    perturber = Perturber(model, asked.kind, centroid, asked.batch_size, device,
                          insert_absent=asked.genes not in (None, "all"), network=asked.emb_mode == "cell_and_gene")
    with progress_bar() if progress else contextlib.nullcontext() as bar:
        task = bar.add_task("perturbing", total=None) if bar is not None else None

        def compute(positions: np.ndarray) -> dict[str, np.ndarray]:
            return perturber.run(cells, positions, columns,
                                 (lambda n: bar.advance(task, n)) if bar is not None else None)

        run_shard(folder, plan, obs, compute, resume, device)
    return folder


def perturb_on_devices(model_path: str | Path, asked: Asked, out: Path, devices: list[str], resume: bool,
                       chunk_cells: int) -> Path:
    """One worker process a device, each a shard of ``len(devices)``, then the merge into ``out``."""
    with output_folder(out, "perturb", OWN_NAMES) as written:
        arguments = {"model_path": str(model_path), "goal": asked.goal, "input_path": asked.input_path,
                     "kind": asked.kind, "where": list(asked.where), "genes": asked.genes,
                     "gene_sets": list(asked.gene_sets), "gmt": list(asked.gmt), "combos": asked.combining.combos,
                     "anchor_gene": asked.combining.anchor, "min_cells": asked.min_cells,
                     "max_cells": asked.max_cells, "seed": asked.seed, "out_dir": str(out),
                     "label_key": asked.label_key, "gene_ids": asked.gene_ids, "layer": asked.layer,
                     "batch_size": asked.batch_size, "fold": asked.fold, "emb_mode": asked.emb_mode,
                     "top_k": asked.top_k, "resume": resume, "chunk_cells": chunk_cells,
                     "progress": False, "merge_when_done": False}
        run_on_devices(devices, perturb, arguments)
        folders = [shard_dir(out, index, len(devices)) for index in range(len(devices))]
        write_outputs(written, merge_shards(folders), out)
    for folder in folders:
        remove(folder)
    return out


def merge_perturb(folders: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """``perturb --merge DIR...``: the shards' outputs, those of one process (see ``perturb_shards``)."""
    folders = [Path(folder) for folder in folders]
    out = Path(out) if out is not None else merged_out(folders[0]) if folders else Path()
    merged = merge_shards(folders)
    with output_folder(out, "perturb", OWN_NAMES) as written:
        write_outputs(written, merged, out)
    return out


def write_outputs(written: Path, merged: Merged, out: Path) -> None:
    """genes.csv, genes.md, shifts.h5ad, plots and settings.json of the merged shards."""
    plan = merged.plan
    identity, columns = plan["identity"], plan["columns"]
    classes, goal = columns["classes"], identity["goal"]
    goal_index = classes.index(goal)
    pairs = merged.pairs
    obs = merged.obs.assign(predicted=np.asarray(classes)[merged.base_probabilities.argmax(1)],
                            **{f"prob_{goal}": merged.base_probabilities[:, goal_index]})
    effects = GeneEffects(names=columns["names"], symbols=columns["symbols"], cell=pairs["cell"],
                          column=pairs["column"], rank=pairs["rank"],
                          values={f"delta_{goal}": pairs["delta"][:, goal_index], "embedding_shift": pairs["shift"],
                                  **{f"delta_{c}": pairs["delta"][:, i] for i, c in enumerate(classes) if c != goal}},
                          annotations={name: np.asarray(values) for name, values in plan["annotations"].items()})
    settings = {key: value for key, value in identity.items() if not key.endswith("_digest")}
    settings["perturbations"] = len(pairs["cell"])
    timing = {"seconds": round(merged.seconds, 2),
              "per_second": round(len(pairs["cell"]) / max(merged.seconds, 1e-9), 1),
              "devices": merged.devices, "shards": len(merged.devices)}
    write_gene_outputs(written, effects, obs, settings, matrix_name="shifts.h5ad",
                       title=f"{identity['perturb']} toward {goal}: change of P({goal})", groups=("donor",),
                       timing=timing)
    if identity["emb_mode"] == "cell_and_gene":
        table = aggregate(pairs["net_cell"], pairs["net_column"], pairs["net_gene"], pairs["net_shift"],
                          pairs["net_rank"], len(columns["names"]))
        gene_name = {int(token): (gene, symbol) for token, gene, symbol in
                     zip(columns["gene_tokens"], columns["gene_ids"], columns["gene_symbols"])}
        write_network(written, table, columns["names"], columns["symbols"], gene_name, identity["top_k"])
    log.info("%d perturbations of %d cells x %d genes in %.1f s (%.0f a second): %s", len(pairs["cell"]),
             identity["cells"], identity["columns"], merged.seconds, timing["per_second"], out)


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
