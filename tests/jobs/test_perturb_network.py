"""Gene-network shifts (perturb_network.py, --emb-mode cell_and_gene): against the encoder's hidden states computed
directly, the null within each affected gene, and shards merged as one process."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.jobs.cell_choice import select_cells
from geneformer_colon.jobs.perturb import merge_perturb, perturb
from geneformer_colon.jobs.predict import GeneIds
from geneformer_colon.report.gene_effects import rank_matched_test


def test_gene_shifts_equal_a_direct_computation(trained_runs, tmp_path):
    model = TrainedClassifier.load(trained_runs[0])
    cells = select_cells(model, trained_runs[0], None, ["label=Tumor"], 1, 0, GeneIds(), None).cells
    cell = np.asarray(cells.tokens.cell_tokens(int(cells.rows[0])), dtype=np.int64)
    gene = model_gene(model, cell[3])
    out = perturb(trained_runs[0], "Normal", where=["label=Tumor"], max_cells=1, genes=gene, out_dir=tmp_path / "p",
                  emb_mode="cell_and_gene", top_k=10_000, progress=False)
    shifts = pd.read_csv(out / "gene_shifts.csv", keep_default_na=False, na_values=[""]).set_index("affected_id")
    bert = model.module.encoder.bert.eval()
    with torch.no_grad():
        before = bert(input_ids=torch.tensor(cell[None]), attention_mask=torch.ones(1, len(cell))).last_hidden_state[0]
        variant = np.delete(cell, 3)
        after = bert(input_ids=torch.tensor(variant[None]),
                     attention_mask=torch.ones(1, len(variant))).last_hidden_state[0]
    others = np.delete(np.arange(len(cell)), 3)
    expected = 1 - torch.nn.functional.cosine_similarity(before[others], after, dim=1).numpy()
    names = [model_gene(model, token) for token in cell[others]]
    assert sorted(shifts.index) == sorted(names) and (shifts["perturbed_id"] == gene).all()
    np.testing.assert_allclose(shifts.loc[names, "mean_cosine_shift"].to_numpy(), expected, atol=1e-5)
    assert (shifts["n_cells"] == 1).all()


def model_gene(model: TrainedClassifier, token: int) -> str:
    return next(gene for gene, value in model.dictionaries.token.items() if value == token)


def test_the_null_is_taken_within_each_group():
    rng = np.random.default_rng(0)
    value, column, rank = rng.normal(size=400), rng.integers(0, 6, 400), rng.random(400)
    group = np.array([0, 0, 0, 1, 1, 1])
    z, p = rank_matched_test(value, column, rank, 6, group=group)
    for members in (np.arange(3), np.arange(3, 6)):
        kept = np.isin(column, members)
        alone, _ = rank_matched_test(value[kept], column[kept] - members[0], rank[kept], 3)
        np.testing.assert_allclose(z[members], alone)
    np.testing.assert_allclose(rank_matched_test(value, column, rank, 6, group=np.zeros(6))[0],
                               rank_matched_test(value, column, rank, 6)[0])


@pytest.mark.slow
def test_two_shards_give_one_process_gene_shifts(trained_runs, tmp_path):
    chosen = {"where": ["label=Tumor"], "max_cells": 4, "genes": "all", "min_cells": 3, "emb_mode": "cell_and_gene",
              "top_k": 5, "progress": False}
    one = perturb(trained_runs[0], "Normal", out_dir=tmp_path / "one", **chosen)
    shards = [perturb(trained_runs[0], "Normal", out_dir=tmp_path / "two", shard=(index, 2), merge_when_done=False,
                      **chosen) for index in range(2)]
    two = merge_perturb(shards)
    assert (one / "gene_shifts.csv").read_bytes() == (two / "gene_shifts.csv").read_bytes()
    table = pd.read_csv(one / "gene_shifts.csv")
    assert table.groupby("perturbed_id").size().max() == 5 and table["fdr"].notna().any()
