"""Study: does a perturbation ranking of genes add anything to counting cells? Each ranking's AUROC against a known
tumour programme, on one run's cells, and why the goal-state embedding shift ranks as it does.

    python bench/perturb_rankings.py RUN_DIR [--donor KUL01] [--start Tumor] [--goal Normal] [--max-cells 30]
                                     [--top 50] [--steps 16] [--out DIR]

On the start-state cells of the test ``--donor`` (``--max-cells`` drawn with seed 0), every gene expressed in 10 of
them deleted in turn (``geneformer-colon perturb``) and integrated gradients of the start class
(``geneformer-colon explain``). The truth: the ``--top`` genes whose mean log-normalised expression (counts per
10,000, log1p) is most higher in start-state than goal-state cells of the run's *training* donors; on the embedded
cohort also the planted tumour programme (``programme_genes``). Rankings, each oriented so a truth gene should score
high: ``mean_delta_<goal>`` (deleting it raises P(goal)), ``mean_embedding_shift`` (deleting it moves the cell
toward the goal centroid), integrated gradients' mean attribution, ``cells_expressing`` and ``-log2fc_expressing``.

The embedding shift is then recomputed from the same forward passes (every pooled embedding kept) against other
goal states, to find what keeps it near chance: the shipped centroid (the goal class's cells of the run's validation
and test donors), the goal cells of the training donors, of the donor itself; the direction goal centroid minus
start centroid; the cosine after centering on the mean of every validation and test cell; and the first encoder
layer's mean-pooled states instead of the last layer's.
"""

from __future__ import annotations

import sys

# bench/tokenize.py shadows the standard library's `tokenize`: take this folder off the module path first.
sys.path = [entry for entry in sys.path if entry not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from geneformer_colon.assembly.trained_classifier import TrainedClassifier  # noqa: E402
from geneformer_colon.common.names import TRAIN  # noqa: E402
from geneformer_colon.data.token_rows import pad_tokens  # noqa: E402
from geneformer_colon.jobs.cell_choice import CellSet, run_cells, run_datamodule, select_cells  # noqa: E402
from geneformer_colon.jobs.explain import explain  # noqa: E402
from geneformer_colon.jobs.perturb import perturb  # noqa: E402
from geneformer_colon.jobs.perturb_columns import choose_columns  # noqa: E402
from geneformer_colon.jobs.perturber import Perturber  # noqa: E402
from geneformer_colon.jobs.predict import GeneIds  # noqa: E402


def truth_genes(run_dir: Path, start: str, goal: str, top: int) -> set[str]:
    """The ``top`` genes most higher in start-state than goal-state cells of the run's training donors."""
    datamodule = run_datamodule(run_dir)
    train = run_cells(datamodule, (TRAIN,))
    cells = ad.read_h5ad(datamodule.cells.path)
    cells = cells[train.obs.index]
    counts = sp.csr_matrix(cells.X, dtype=np.float64)
    normalised = sp.diags(1e4 / np.maximum(np.asarray(counts.sum(1)).ravel(), 1)) @ counts
    normalised.data = np.log1p(normalised.data)
    label = cells.obs["label"].astype(str).to_numpy()
    difference = (np.asarray(normalised[label == start].mean(0)).ravel()
                  - np.asarray(normalised[label == goal].mean(0)).ravel())
    ids = cells.var["ensembl_id"].astype(str).to_numpy()
    order = [index for index in np.argsort(-difference, kind="stable") if ids[index]]
    return set(ids[order[:top]])


def auroc(table: pd.DataFrame, score: np.ndarray, truth: set[str]) -> float:
    member = table["ensembl_id"].isin(truth).to_numpy()
    finite = np.isfinite(score)
    return float(roc_auc_score(member[finite], score[finite])) if 0 < member[finite].sum() < finite.sum() else np.nan


class Recorder:
    """Every forward pass's pooled embedding (last layer) and the first layer's mean-pooled states."""

    def __init__(self, model: TrainedClassifier) -> None:
        self.model, self.last, self.first, self.top = model, [], [], []
        self.infer = model.infer
        model.module.encoder.bert.encoder.layer[0].register_forward_hook(self.keep_first)
        model.module.encoder.bert.register_forward_hook(self.keep_top)
        self.mask = None
        model.infer = self.recorded

    def keep_top(self, module, inputs, output) -> None:
        """The last layer's state at position 0 (the top-ranked gene in V1: what pooling=cls would pool)."""
        self.top.append(output.last_hidden_state[:, 0].float().numpy())

    def keep_first(self, module, inputs, output) -> None:
        states = output[0] if isinstance(output, tuple) else output
        weights = self.mask.unsqueeze(-1).to(states.dtype)
        self.first.append(((states * weights).sum(1) / weights.sum(1)).float().numpy())

    def recorded(self, input_ids, attention_mask, device="cpu"):
        self.mask = attention_mask
        probabilities, embeddings = self.infer(input_ids, attention_mask, device)
        self.last.append(embeddings)
        return probabilities, embeddings

    def embed(self, cells: CellSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each cell's last-layer, first-layer and position-0 embeddings, a cell a pass."""
        self.last, self.first, self.top = [], [], []
        for row in cells.rows:
            self.recorded(*pad_tokens([np.asarray(cells.tokens.cell_tokens(int(row)))[None, :]], self.model.pad_id))
        return np.concatenate(self.last), np.concatenate(self.first), np.concatenate(self.top)


def shift(variants: np.ndarray, bases: np.ndarray, goal: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """cos(variant, goal) - cos(base, goal), after subtracting ``centre`` from all three where given."""
    if centre is not None:
        variants, bases, goal = variants - centre, bases - centre, goal - centre
    unit = goal / np.linalg.norm(goal)
    return variants @ unit / np.linalg.norm(variants, axis=1) - bases @ unit / np.linalg.norm(bases, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--donor", default="KUL01")
    parser.add_argument("--start", default="Tumor")
    parser.add_argument("--goal", default="Normal")
    parser.add_argument("--max-cells", type=int, default=30)
    parser.add_argument("--top", type=int, default=50)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", type=Path, help="where the perturb and explain folders go (default beside the run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or args.run_dir / "perturb_rankings"
    where = [f"label={args.start}", f"donor={args.donor}"]
    started = time.perf_counter()
    perturbed = perturb(args.run_dir, args.goal, where=where, max_cells=args.max_cells, out_dir=out / "perturb",
                        progress=False)
    seconds = time.perf_counter() - started
    table = pd.read_csv(perturbed / "genes.csv")
    started = time.perf_counter()
    explained, _ = explain(args.run_dir, target=args.start, where=where, max_cells=args.max_cells,
                           steps=args.steps, out_dir=out / "explain")
    explain_seconds = time.perf_counter() - started
    attributions = pd.read_csv(explained / "genes.csv").set_index("ensembl_id")["mean_attribution"]
    truths = {f"top {args.top} {args.start}-vs-{args.goal} genes of the training donors":
              truth_genes(args.run_dir, args.start, args.goal, args.top)}
    try:
        from geneformer_colon.data.synthetic import programme_genes

        truths[f"planted {args.start} programme"] = set(programme_genes(2000, 0)[args.start])
    except KeyError:
        pass
    rankings = {f"mean_delta_{args.goal} (deletion)": table[f"mean_delta_{args.goal}"].to_numpy(),
                "mean_embedding_shift (deletion, toward the goal centroid)": table["mean_embedding_shift"].to_numpy(),
                "integrated gradients (mean attribution)": attributions.reindex(table["ensembl_id"]).to_numpy(),
                "cells_expressing (count)": table["cells_expressing"].to_numpy().astype(float),
                "-log2fc_expressing (goal vs start share)": -table["log2fc_expressing"].to_numpy()}
    print(f"{args.donor}'s {args.start} cells toward {args.goal}: {len(table)} genes, "
          f"{int(table['n_cells'].sum())} deletions in {seconds:.0f} s, explain {explain_seconds:.0f} s")
    print("| ranking | " + " | ".join(truths) + " |")
    print("|---|" + "---|" * len(truths))
    for name, score in rankings.items():
        print(f"| {name} | " + " | ".join(f"{auroc(table, score, truth):.2f}" for truth in truths.values()) + " |")
    investigate(args, table, truths)


def investigate(args: argparse.Namespace, table: pd.DataFrame, truths: dict[str, set[str]]) -> None:
    """The embedding shift against other goal states, from one recorded pass over the same perturbations."""
    model = TrainedClassifier.load(args.run_dir)
    recorder = Recorder(model)
    where = [f"label={args.start}", f"donor={args.donor}"]
    choice = select_cells(model, args.run_dir, None, where, args.max_cells, 0, GeneIds(), None)
    cells = choice.cells
    columns = choose_columns(choice.names, cells, "all", (), 10, False)
    last_every, first_every, top_every = recorder.embed(choice.every)
    label = choice.every.obs["label"].astype(str).to_numpy()
    donor = choice.every.obs["donor"].astype(str).to_numpy()
    train = run_cells(run_datamodule(args.run_dir), (TRAIN,))
    train = train.subset((train.obs["label"].astype(str) == args.goal).to_numpy())
    last_train, first_train, _ = recorder.embed(train)
    recorder.last, recorder.first, recorder.top = [], [], []
    done = Perturber(model, "delete", last_every[label == args.goal].mean(0)).run(cells, np.arange(len(cells.rows)),
                                                                                  columns)
    last, first, top = (np.concatenate(recorder.last), np.concatenate(recorder.first),
                        np.concatenate(recorder.top))
    weights = model.module.head.linear.weight.detach().numpy()
    axis = weights[model.class_names.index(args.goal)] - weights[model.class_names.index(args.start)]
    counts = np.bincount(done["cell"], minlength=len(cells.rows)) + 1  # each cell's base row, then its variants
    base_rows = np.concatenate([[0], np.cumsum(counts)[:-1]])
    variant_rows = np.setdiff1d(np.arange(len(last)), base_rows)
    start_last = last[base_rows].mean(0)
    goals = {"shipped: goal cells of the validation and test donors": (last_every[label == args.goal].mean(0), None,
                                                                        last),
             "goal cells of the training donors": (last_train.mean(0), None, last),
             f"goal cells of {args.donor} alone": (last_every[(label == args.goal) & (donor == args.donor)].mean(0),
                                                   None, last),
             "direction goal centroid - start centroid": (last_every[label == args.goal].mean(0) - start_last, None,
                                                          last),
             "centred on every validation and test cell": (last_every[label == args.goal].mean(0),
                                                           last_every.mean(0), last),
             "first layer, centred": (first_every[label == args.goal].mean(0), first_every.mean(0), first),
             "first layer, training goal cells": (first_train.mean(0), None, first),
             "position 0 instead of the mean (pooling=cls)": (top_every[label == args.goal].mean(0), None, top),
             "the head's goal-minus-start weights (the classifier's axis)": (axis, None, last)}
    print("\nembedding shift toward the goal, by goal state (AUROC):")
    print("| goal state | " + " | ".join(truths) + " | mean cos(cell, centroid) |")
    print("|---|" + "---|" * (len(truths) + 1))
    for name, (goal, centre, states) in goals.items():
        values = shift(states[variant_rows], states[base_rows][done["cell"]], goal, centre)
        per_gene = pd.Series(values).groupby(done["column"]).mean().reindex(range(len(columns))).to_numpy()
        genes = pd.DataFrame({"ensembl_id": columns.names})
        base = states[base_rows] - (centre if centre is not None else 0)
        target = goal - (centre if centre is not None else 0)
        similarity = float(np.mean(base @ target / np.linalg.norm(base, axis=1) / np.linalg.norm(target)))
        print(f"| {name} | " + " | ".join(f"{auroc(genes, per_gene, truth):.2f}" for truth in truths.values())
              + f" | {similarity:.3f} |")


if __name__ == "__main__":
    main()
