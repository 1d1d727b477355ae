"""In-silico perturbation: ``geneformer-colon perturb RUN_DIR|EXPORT_DIR [INPUT.h5ad] --goal CLASS``.

Geneformer's perturbations of a cell's rank-value encoding (``model.perturbations``: a gene, a set,
K genes of a list at once, an anchor gene with each other gene; deleted or overexpressed), chosen by
``perturb_columns``, run through the model by ``perturber.Perturber`` (each perturbed cell once, the
unperturbed pass once a cell, under ``torch.inference_mode``; bf16 autocast on GPUs) in shards and
chunks of cells (``perturb_shards``: resume, merge, devices). Measured per cell and column: the change
of every class probability, the shift of the pooled embedding toward the goal state, and with
``--emb-mode cell_and_gene`` the gene-network shifts (``perturb_network``). This module plans a job
(cells, columns, goal centroid), runs it and writes the merged outputs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from geneformer_colon.assembly.batching import token_budget
from geneformer_colon.assembly.trained_classifier import TrainedClassifier, bf16_autocast
from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import remove
from geneformer_colon.common.output_folder import FolderBusy, output_folder
from geneformer_colon.data.dictionaries import FRAME_TOKENS
from geneformer_colon.jobs.cell_choice import CellSet, check_cell_counts, goal_centroid, select_cells
from geneformer_colon.jobs.perturb_columns import (
    Columns,
    Combining,
    cell_gene_tokens,
    choose_columns,
    column_annotations,
)
from geneformer_colon.jobs.perturb_network import (
    NETWORK_OUTPUTS,
    aggregate,
    check_network,
    write_network,
)
from geneformer_colon.jobs.perturb_shards import (
    Merged,
    Plan,
    digest,
    merge_shards,
    merged_out,
    ready_to_merge,
    run_on_devices,
    run_shard,
    shard_dir,
    share,
    sibling_shards,
)
from geneformer_colon.jobs.perturber import Perturber
from geneformer_colon.jobs.predict import GeneIds
from geneformer_colon.report.gene_effects import GENE_OUTPUTS, GeneEffects, write_gene_outputs

log = logging.getLogger(__name__)

PERTURBATIONS = ("delete", "overexpress")
TIMING = ("seconds", "per_second", "devices", "shards")  # settings that differ between equal results
OWN_NAMES = (*GENE_OUTPUTS, "shifts.h5ad", *NETWORK_OUTPUTS)


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
    batch_size: int | None = 64
    fold: str | None = None
    emb_mode: str = "cell"
    top_k: int = 20
    max_tokens: int | None = None

    def budget(self, model: TrainedClassifier) -> tuple[int, int | None]:
        """Rows a forward pass and padded tokens a pass (``assembly.batching.token_budget``: the verbs' one)."""
        return token_budget(self.batch_size, self.max_tokens, model.settings.resolved_input_size)

    def check(self) -> None:
        """Everything that needs no model or data, one line each."""
        if self.kind not in PERTURBATIONS:
            raise InputError(f"--perturb {self.kind}: unknown; use one of {', '.join(PERTURBATIONS)}")
        check_cell_counts(self.max_cells, self.min_cells)
        self.combining.check(self.genes)


def plan_job(model_path: str | Path, asked: Asked, shard: tuple[int, int], chunk_cells: int, device: str
             ) -> tuple[TrainedClassifier, Plan, CellSet, Columns, np.ndarray, pd.DataFrame, np.ndarray]:
    """The model, the shard's plan, the chosen cells, the columns, the goal centroid, the cells' obs and each cell's
    number of perturbations."""
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
                                            asked.budget(model)[0], device)
    perturber = Perturber(model, asked.kind, centroid, insert_absent=asked.genes not in (None, "all"))
    counts = perturber.count(cells, columns)
    costs = counts * cells.tokens.lengths[cells.rows]
    goal_state = choice.every.subset(goal_cells(choice.every.obs)) if asked.label_key in choice.every.obs else None
    annotations = column_annotations(columns, cells, goal_state, framed)
    identity = {"command": "perturb", "model": str(model_path), "input": str(asked.input_path or "run val/test cells"),
                "perturb": asked.kind, "goal": goal, "where": list(asked.where), "genes": asked.genes,
                "gene_sets": list(asked.gene_sets), "gmt": list(asked.gmt), "combos": asked.combining.combos,
                "anchor_gene": asked.combining.anchor, "min_cells": asked.min_cells, "max_cells": asked.max_cells,
                "seed": asked.seed, "cells": len(cells.rows), "columns": len(columns), "goal_centroid": centroid_from,
                "batch_size": asked.budget(model)[0], "max_tokens": asked.budget(model)[1],
                "emb_mode": asked.emb_mode, "top_k": asked.top_k, "device_type": torch.device(device).type,
                "precision": "bf16" if bf16_autocast(device) else "fp32",
                "cells_digest": digest(list(cells.obs.index)),
                "columns_digest": digest(columns.names), "centroid_digest": digest(centroid.astype(np.float32))}
    obs = cells.obs.copy()
    named = {"names": list(columns.names), "symbols": list(columns.symbols), "classes": list(model.class_names)}
    if asked.emb_mode == "cell_and_gene":  # the affected genes' names, for the merge, which reads no model
        tokens = np.unique(np.concatenate(cell_gene_tokens(cells, framed)))
        ids = list(choice.names.ids(tokens))
        named.update(gene_tokens=[str(token) for token in tokens], gene_ids=ids, gene_symbols=choice.names.symbols(ids))
    plan = Plan(identity, shard[0], shard[1], share(costs, *shard), chunk_cells, named,
                {name: values.tolist() for name, values in annotations.items()})  # counts stay integers
    return model, plan, cells, columns, centroid, obs, counts


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
    batch_size: int | None = 64,
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
    max_tokens: int | None = None,
) -> Path:
    """Perturb the chosen cells' genes toward ``goal``; write genes.csv, genes.md, shifts.h5ad and plots (see the
    module docstring); return the output folder. A CV run: the ensemble of its folds, or its ``fold``. ``shard``
    (I, N): only that share of the cells, into ``<out>.shard-I-of-N`` (merged into ``out`` by the last shard to
    finish, with ``merge_when_done``); ``devices``: one worker process a device over as many shards, then merged."""
    asked = Asked(goal, input_path, kind, tuple(where), genes, tuple(gene_sets), tuple(gmt),
                  Combining(combos, anchor_gene), min_cells, max_cells, seed, label_key, gene_ids, layer, batch_size,
                  fold, emb_mode, top_k, max_tokens)
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
        if merge_when_done and ready_to_merge(siblings):
            try:
                return merge_perturb(siblings, out)
            except FolderBusy:  # another shard finishing at the same time merges
                log.info("%s: being merged by another shard", out)
        return folder
    with output_folder(out, "perturb", OWN_NAMES) as written:
        folder = compute_shard(model_path, asked, out, (0, 1), chunk_cells, device, resume, progress)
        write_outputs(written, merge_shards([folder]), out)
    remove(folder)
    return out


def compute_shard(model_path: str | Path, asked: Asked, out: Path, shard: tuple[int, int], chunk_cells: int,
                  device: str, resume: bool, progress: bool) -> Path:
    """The shard's chunks computed (those a stopped run left kept, with ``resume``); its folder."""
    model, plan, cells, columns, centroid, obs, counts = plan_job(model_path, asked, shard, chunk_cells, device)
    folder = shard_dir(out, *shard)
    rows, tokens = asked.budget(model)
    perturber = Perturber(model, asked.kind, centroid, rows, device, insert_absent=asked.genes not in (None, "all"),
                          network=asked.emb_mode == "cell_and_gene", max_tokens=tokens)
    with progress_bar() if progress else contextlib.nullcontext() as bar:
        task = bar.add_task("perturbing", total=int(counts[plan.cells].sum())) if bar is not None else None

        def compute(positions: np.ndarray) -> dict[str, np.ndarray]:
            return perturber.run(cells, positions, columns,
                                 (lambda n: bar.advance(task, n)) if bar is not None else None)

        run_shard(folder, plan, obs, compute, resume, device)
    return folder


def perturb_on_devices(model_path: str | Path, asked: Asked, out: Path, devices: list[str], resume: bool,
                       chunk_cells: int) -> Path:
    """One worker process a device, each a shard of ``len(devices)`` (``compute_shard`` of the same ``asked``, which
    pickles), then the merge into ``out``."""
    with output_folder(out, "perturb", OWN_NAMES) as written:
        arguments = {"model_path": model_path, "asked": asked, "out": out, "chunk_cells": chunk_cells,
                     "resume": resume, "progress": False}
        run_on_devices(devices, compute_shard, arguments, out)
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
