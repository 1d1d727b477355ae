"""What perturb perturbs (perturb_columns.py): every pair of a list, an anchor with each gene, GMT sets, and the
trivial rankings beside each column, checked against one-cell-at-a-time passes and counts by hand."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.cli import verbs as cli
from geneformer_colon.data.tokenizer import TokenizedCells
from geneformer_colon.jobs.cell_choice import select_cells
from geneformer_colon.jobs.perturb_columns import Combining, choose_columns, expressed_genes
from geneformer_colon.jobs.predict import GeneIds
from geneformer_colon.model.perturbations import perturbed_tokens


@pytest.fixture(scope="module")
def chosen(trained_runs):
    model = TrainedClassifier.load(trained_runs[0])
    return model, select_cells(model, trained_runs[0], None, ["label=Tumor"], 4, 0, GeneIds(), None)


def test_combos_make_n_choose_2_columns_and_an_anchor_one_a_gene(chosen):
    _, choice = chosen
    listed = choice.names.ids(expressed_genes(choice.cells, 1, False)[:5])
    pairs = choose_columns(choice.names, choice.cells, ",".join(listed), (), 1, False, combining=Combining(2))
    assert len(pairs) == 5 * 4 // 2 and pairs.names[0] == f"{listed[0]}+{listed[1]}"
    assert set(pairs.rules) == {"combo"} and all(len(tokens) == 2 for tokens in pairs.tokens)
    anchored = choose_columns(choice.names, choice.cells, ",".join(listed), (), 1, False,
                              combining=Combining(anchor=listed[2]))
    assert anchored.names == [f"{listed[2]}+{gene}" for gene in listed if gene != listed[2]]


@pytest.mark.slow
def test_pairs_and_anchored_pairs_are_one_cell_at_a_time_passes(trained_runs, chosen, tmp_path):
    model, choice = chosen
    cells = choice.cells
    genes = choice.names.ids(expressed_genes(cells, 2, False)[:3])
    base = model.apply(cells.tokens, cells.rows)[0]
    normal = model.class_names.index("Normal")
    for arguments, rule in ((["--combos", "2"], "combo"), (["--anchor-gene", genes[0]], "anchored")):
        out = tmp_path / rule
        cli.main(["perturb", str(trained_runs[0]), "--goal", "Normal", "--where", "label=Tumor", "--max-cells", "4",
                  "--genes", ",".join(genes), "--out", str(out), *arguments])
        shifts = ad.read_h5ad(out / "shifts.h5ad")
        assert shifts.n_vars == (3 if rule == "combo" else 2)  # n(n-1)/2 pairs; the anchor with each other
        values = shifts.X.toarray()
        coo = shifts.X.tocoo()
        measured = np.zeros_like(values, dtype=bool)
        measured[coo.row, coo.col] = True
        rows = shifts.obs_names.get_indexer(cells.obs.index)
        for index, (cell, row) in enumerate(zip(cells.rows, rows)):
            tokens = np.asarray(cells.tokens.cell_tokens(int(cell)), dtype=np.int64)
            for column, name in enumerate(shifts.var_names):
                pair = [choice.names.token_of[gene] for gene in name.split("+")]
                variant = perturbed_tokens(tokens, pair, "delete", model.settings.resolved_input_size, False, rule)
                assert measured[row, column] == (variant is not None) == bool(np.isin(pair, tokens).all())
                if variant is not None:
                    single = TokenizedCells(variant, np.array([0, len(variant)]), 0)
                    expected = model.apply(single)[0][0, normal] - base[index, normal]
                    np.testing.assert_allclose(values[row, column], expected, atol=1e-5)
        assert json.loads((out / "settings.json").read_text())["combos" if rule == "combo" else "anchor_gene"]


def test_gmt_sets_and_the_rankings_beside_each_column(trained_runs, chosen, tmp_path):
    _, choice = chosen
    cells = choice.cells
    held = [set(cells.tokens.cell_tokens(int(row)).tolist()) for row in cells.rows]
    common = expressed_genes(cells, 4, False)[:3]
    never = next(token for token in sorted(choice.names.token_of.values()) if not any(token in h for h in held))
    ids = choice.names.ids(np.array([*common, never]))
    gmt = tmp_path / "sets.gmt"
    gmt.write_text(f"PAIR\t-\t{ids[0]}\t{ids[1]}\nWITH_ABSENT\t-\t{ids[2]}\t{ids[3]}\tNOT_A_GENE\n")
    out = tmp_path / "out"
    cli.main(["perturb", str(trained_runs[0]), "--goal", "Normal", "--where", "label=Tumor", "--max-cells", "4",
              "--genes", ",".join(ids), "--gene-sets", str(gmt), "--out", str(out)])
    table = pd.read_csv(out / "genes.csv").set_index("ensembl_id")
    assert table.loc[["set:PAIR", "set:WITH_ABSENT"], "set_size"].tolist() == [2, 2]
    assert table.loc[["set:PAIR", "set:WITH_ABSENT"], "set_expressed"].tolist() == [2, 1]
    assert table.loc[list(ids), "set_size"].isna().all()
    counts = [sum(choice.names.token_of[gene] in h for h in held) for gene in ids]
    assert table.loc[list(ids), "cells_expressing"].tolist() == counts == [4, 4, 4, 0]
    # the goal state's share of cells holding the gene, over the chosen cells' (half a cell added to each)
    every = select_cells(*chosen[:1], trained_runs[0], None, [], None, 0, GeneIds(), None).cells
    normal = every.subset((every.obs["label"] == "Normal").to_numpy())
    goal_held = [set(normal.tokens.cell_tokens(int(row)).tolist()) for row in normal.rows]
    for gene, count in zip(ids, counts):
        in_goal = sum(choice.names.token_of[gene] in h for h in goal_held)
        expected = np.log2(((in_goal + 0.5) / (len(goal_held) + 1)) / ((count + 0.5) / (len(held) + 1)))
        assert table.loc[gene, "log2fc_expressing"] == pytest.approx(expected)
