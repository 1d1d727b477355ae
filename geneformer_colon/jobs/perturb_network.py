"""Gene-network shifts (``perturb --emb-mode cell_and_gene``, upstream's ``cell_and_gene`` mode): for each perturbed
column, how far every *other* gene's contextual embedding (the encoder's last hidden state at its token) moves in
the cell: ``cosine_shift = 1 - cos(original, perturbed)`` (0: unmoved), for the genes the cell holds before and after
the perturbation (the perturbed genes, ``<cls>``/``<eos>`` and a gene truncated away left out).

Aggregated over cells per (perturbed column, affected gene), with the rank-matched null of ``report.gene_effects``
taken within each affected gene: a pair is compared with the shifts of the *same* affected gene when *other*
columns at the same relative rank are perturbed, so a gene that moves whatever is deleted (a neighbour in rank, a
hub) is not called a target of every gene. Written sparse: the ``--top-k`` affected genes of each column, largest
mean shift first (the FDR over every pair measured), as ``gene_shifts.csv`` and ``gene_shifts.h5ad`` (columns x
affected genes; X the mean shift, layers ``n_cells`` and ``fdr``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from geneformer_colon.assembly.trained_classifier import FoldEnsemble, TrainedClassifier
from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import atomic_path
from geneformer_colon.report.gene_effects import fdr, rank_matched_test

EMB_MODES = ("cell", "cell_and_gene")
NETWORK_OUTPUTS = ("gene_shifts.csv", "gene_shifts.h5ad")
# A chunk's gene-network arrays: per (cell, column, affected gene) the shift, and the column's rank in the cell
NETWORK_KEYS = ("net_cell", "net_column", "net_gene", "net_shift", "net_rank")


def check_network(model: TrainedClassifier, emb_mode: str, top_k: int) -> None:
    if emb_mode not in EMB_MODES:
        raise InputError(f"--emb-mode {emb_mode}: unknown; use one of {', '.join(EMB_MODES)}")
    if top_k < 1:
        raise InputError(f"--top-k {top_k}: give a number of affected genes >= 1")
    if emb_mode == "cell_and_gene" and isinstance(model, FoldEnsemble):
        raise InputError("--emb-mode cell_and_gene: a CV run's folds each embed genes their own way; give --fold "
                         "DONOR to use one")


@contextlib.contextmanager
def captured_hidden(model: TrainedClassifier) -> Iterator[list[np.ndarray]]:
    """The encoder's last hidden states of every forward pass in the block (one array a pass, appended)."""
    states: list[np.ndarray] = []

    def keep(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        states.append(output.last_hidden_state.float().cpu().numpy())

    handle = model.module.encoder.bert.register_forward_hook(keep)
    try:
        yield states
    finally:
        handle.remove()


def cosine_shifts(original: np.ndarray, perturbed: np.ndarray) -> np.ndarray:
    """1 - cos of each row pair."""
    dot = (original * perturbed).sum(1)
    norms = np.maximum(np.linalg.norm(original, axis=1) * np.linalg.norm(perturbed, axis=1), 1e-12)
    return 1.0 - dot / norms


def row_shifts(cell: np.ndarray, base_states: np.ndarray, row: np.ndarray, states: np.ndarray,
               perturbed: np.ndarray, head: int) -> tuple[np.ndarray, np.ndarray]:
    """One variant's affected genes (tokens) and their cosine shifts: the cell's genes (``cell[head:len-head]``)
    still in the variant ``row`` (its tokens, unpadded), but the perturbed ones."""
    genes = cell[head: len(cell) - head]
    where = {int(token): position + head for position, token in enumerate(genes)}
    keep = [index for index, token in enumerate(row.tolist()) if token in where]
    tokens = row[keep]
    mask = ~np.isin(tokens, perturbed)
    keep, tokens = np.asarray(keep, dtype=np.int64)[mask], tokens[mask]
    original = base_states[[where[int(token)] for token in tokens]]
    return tokens, cosine_shifts(original, states[keep]).astype(np.float32)


def aggregate(cell: np.ndarray, column: np.ndarray, gene: np.ndarray, shift: np.ndarray, rank: np.ndarray,
              n_columns: int) -> pd.DataFrame:
    """Per (column, affected gene): cells, mean shift, z and p against the rank-matched null within the gene, FDR."""
    genes, gene_index = np.unique(gene, return_inverse=True)
    key = column.astype(np.int64) * len(genes) + gene_index
    pairs, pair_index = np.unique(key, return_inverse=True)
    z, p = rank_matched_test(shift, pair_index, rank, len(pairs), group=pairs % len(genes))
    table = pd.DataFrame({"column": pairs // len(genes), "gene": genes[pairs % len(genes)],
                          "n_cells": np.bincount(pair_index, minlength=len(pairs)),
                          "mean_cosine_shift": np.bincount(pair_index, weights=shift.astype(np.float64),
                                                           minlength=len(pairs)) / np.bincount(pair_index,
                                                                                               minlength=len(pairs)),
                          "z": z, "p_value": p})
    table["fdr"] = fdr(table["p_value"].to_numpy())
    return table


def write_network(out: Path, table: pd.DataFrame, names: list[str], symbols: list[str],
                  gene_name: dict[int, tuple[str, str]], top_k: int) -> None:
    """gene_shifts.csv and gene_shifts.h5ad: each column's ``top_k`` affected genes (see the module docstring)."""
    top = (table.sort_values(["column", "mean_cosine_shift", "gene"], ascending=[True, False, True], kind="stable")
           .groupby("column", sort=True).head(top_k))
    rows = pd.DataFrame({"perturbed_id": np.asarray(names, dtype=object)[top["column"]],
                         "perturbed_symbol": np.asarray(symbols, dtype=object)[top["column"]],
                         "affected_id": [gene_name[int(token)][0] for token in top["gene"]],
                         "affected_symbol": [gene_name[int(token)][1] for token in top["gene"]],
                         **{name: top[name].to_numpy() for name in ("n_cells", "mean_cosine_shift", "z", "p_value",
                                                                    "fdr")}})
    with atomic_path(out / "gene_shifts.csv") as tmp:
        rows.to_csv(tmp, index=False)
    affected = sorted(set(rows["affected_id"]))
    position = {gene: index for index, gene in enumerate(affected)}
    coordinates = (top["column"].to_numpy(), np.array([position[gene] for gene in rows["affected_id"]], np.int64))
    shape = (len(names), len(affected))

    def matrix(values: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix((values.astype(np.float32), coordinates), shape=shape)

    network = ad.AnnData(X=matrix(top["mean_cosine_shift"].to_numpy()),
                         layers={"n_cells": matrix(top["n_cells"].to_numpy()), "fdr": matrix(top["fdr"].to_numpy())},
                         obs=pd.DataFrame({"symbol": list(symbols)}, index=pd.Index(list(names), dtype=str)),
                         var=pd.DataFrame({"symbol": [gene_name_of(rows, gene) for gene in affected]},
                                          index=pd.Index(affected, dtype=str)))
    with atomic_path(out / "gene_shifts.h5ad") as tmp:
        network.write_h5ad(tmp)


def gene_name_of(rows: pd.DataFrame, gene: str) -> str:
    symbol = rows.loc[rows["affected_id"] == gene, "affected_symbol"].iloc[0]
    return symbol if isinstance(symbol, str) else ""
