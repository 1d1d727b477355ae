"""Why a cell is called Tumor: in-silico perturbation (perturb.py), checked against Geneformer's definitions,
one-cell-at-a-time passes, predict, scipy, and the synthetic cohort's planted programme (integrated gradients:
test_explain.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.stats
from helpers.paths import HELPERS
from helpers.processes import run_script, wait_for
from helpers.runs import programme_auroc

from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.cli import verbs as cli
from geneformer_colon.cli.verbs import STOPPED
from geneformer_colon.common.errors import InputError, Interrupted
from geneformer_colon.common.output_folder import WRITTEN, output_folder
from geneformer_colon.data.tokenizer import TokenizedCells
from geneformer_colon.jobs.cell_choice import select_cells
from geneformer_colon.jobs.perturb import perturb
from geneformer_colon.jobs.perturb_columns import choose_columns
from geneformer_colon.jobs.perturber import Perturber
from geneformer_colon.jobs.predict import GeneIds
from geneformer_colon.model.perturbations import inserted_variants, perturbed_tokens, single_gene_variants

CLS, EOS = 2, 3


@pytest.mark.parametrize("framed", [False, True])
def test_deletion_and_overexpression_build_geneformers_token_lists(framed):
    def cell(*genes: int) -> list[int]:
        return [CLS, *genes, EOS] if framed else list(genes)

    def made(genes, kind, input_size=10):
        variant = perturbed_tokens(np.array(cell(10, 11, 12, 13)), genes, kind, input_size, framed)
        return None if variant is None else variant.tolist()

    assert made([12], "delete") == cell(10, 11, 13)  # removed, the rest move up
    assert made([10], "delete") == cell(11, 12, 13)
    assert made([12], "overexpress") == cell(12, 10, 11, 13)  # to the front, after <cls> where there is one
    assert made([10], "overexpress") == cell(10, 11, 12, 13)
    assert made([99], "delete") is None  # a gene the cell lacks: nothing to delete
    assert made([99], "overexpress") == cell(99, 10, 11, 12, 13)  # inserted
    at_input_size = len(cell(10, 11, 12, 13))
    assert made([99], "overexpress", at_input_size) == cell(99, 10, 11, 12)  # the last gene drops, <eos> stays
    assert made([12], "overexpress", at_input_size) == cell(12, 10, 11, 13)  # a moved gene keeps the length
    assert made([13, 11], "delete") == cell(10, 12)  # a set at once
    assert made([13, 99, 11], "overexpress") == cell(13, 99, 11, 10, 12)  # in the set's order

    # the batched builders give the same rows, every position of the cell
    tokens = np.array(cell(10, 11, 12, 13, 14, 15))
    head = 1 if framed else 0
    positions = np.arange(6) + head
    for kind in ("delete", "overexpress"):
        expected = [perturbed_tokens(tokens, [tokens[p]], kind, 20, framed).tolist() for p in positions]
        assert single_gene_variants(tokens, positions, kind, head).tolist() == expected
    for size in (20, len(tokens)):
        expected = [perturbed_tokens(tokens, [g], "overexpress", size, framed).tolist() for g in (98, 99)]
        assert inserted_variants(tokens, np.array([98, 99]), head, size, framed).tolist() == expected


def one_at_a_time(model: TrainedClassifier, cell: np.ndarray, genes: np.ndarray, kind: str) -> np.ndarray:
    variant = perturbed_tokens(cell, genes, kind, model.settings.resolved_input_size, False)
    single = TokenizedCells(variant, np.array([0, len(variant)]), 0)
    return model.apply(single)[0][0]


def test_batched_perturbation_equals_one_cell_at_a_time(trained_runs):
    model = TrainedClassifier.load(trained_runs[0])
    choice = select_cells(model, trained_runs[0], None, ["label=Tumor"], 9, 0, GeneIds(), None)
    cells = choice.cells
    listed = choose_columns(choice.names, cells, "all", (), 4, False)
    named = ",".join(listed.names[:4] + [listed.names[-1]])
    gene_set = Path(trained_runs[0]) / "set.txt"
    gene_set.write_text("\n".join(listed.names[5:8]) + "\n")
    base, embeddings = model.apply(cells.tokens, cells.rows)
    for kind, genes in (("delete", "all"), ("overexpress", named)):
        columns = choose_columns(choice.names, cells, genes, [str(gene_set)], 4, False)
        done = Perturber(model, kind, embeddings.mean(0), batch_size=7, insert_absent=genes != "all").run(
            cells, np.arange(len(cells.rows)), columns)
        np.testing.assert_allclose(done["base_probabilities"], base, atol=1e-6)
        assert len(done["cell"]) == Perturber(model, kind, embeddings.mean(0), insert_absent=genes != "all").count(
            cells, columns).sum()
        assert len(set(zip(done["cell"].tolist(), done["column"].tolist()))) == len(done["cell"])
        for index in np.random.default_rng(0).choice(len(done["cell"]), min(40, len(done["cell"])), replace=False):
            cell = np.asarray(cells.tokens.cell_tokens(int(cells.rows[done["cell"][index]])), dtype=np.int64)
            expected = one_at_a_time(model, cell, columns.tokens[done["column"][index]], kind)
            np.testing.assert_allclose(done["delta"][index], expected - base[done["cell"][index]], atol=1e-5)
        if kind == "overexpress":  # every listed gene in every cell (inserted where absent); the set everywhere
            assert len(done["cell"]) == len(cells.rows) * len(columns)


def test_outputs_match_predict_genes_csv_and_scipy(trained_runs, tmp_path):
    run_dir = trained_runs[0]
    out = perturb(run_dir, "Normal", where=["label=Tumor"], min_cells=5, out_dir=tmp_path / "p", progress=False)
    table = pd.read_csv(out / "genes.csv", keep_default_na=False, na_values=[""])
    shifts = ad.read_h5ad(out / "shifts.h5ad")
    assert list(shifts.var_names) == list(table["ensembl_id"])
    assert shifts.X.shape == (shifts.n_obs, len(table)) and "embedding_shift" in shifts.layers
    predictions = pd.concat([pd.read_csv(run_dir / "predictions" / f"{split}.csv") for split in ("val", "test")])
    predictions = predictions.set_index("cell_id")
    # where=label=Tumor chose the run's validation and test cells labelled Tumor, each one of them
    assert set(shifts.obs_names) == set(predictions.index[predictions["true"] == "Tumor"])
    assert (shifts.obs["label"] == "Tumor").all() and set(shifts.obs["donor"]) == {"KUL01", "KUL19"}
    # the unperturbed pass is predict's
    np.testing.assert_allclose(shifts.obs["prob_Normal"].to_numpy(),
                               predictions.loc[shifts.obs_names, "prob_Normal"].to_numpy(), atol=1e-5)
    # per-cell values and the table agree; the FDR is scipy's
    stored = np.asarray(shifts.X.sum(0)).ravel() / table["n_cells"].to_numpy()
    np.testing.assert_allclose(stored, table["mean_delta_Normal"].to_numpy(), rtol=1e-4, atol=1e-7)
    assert (np.diff(shifts.X.tocsc().indptr) == table["n_cells"].to_numpy()).all()
    finite = table["p_value"].notna()
    assert finite.sum() > 10
    np.testing.assert_allclose(table.loc[finite, "fdr"],
                               scipy.stats.false_discovery_control(table.loc[finite, "p_value"]), rtol=1e-12)
    assert {"ci_low", "ci_high", "median_delta_Normal", "mean_embedding_shift", "donor_KUL01", "donor_KUL19",
            "donor_agreement"} <= set(table.columns)
    assert "## Top 30: largest mean delta_Normal" in (out / "genes.md").read_text()
    assert (out / "plots" / "top_genes.png").stat().st_size and (out / "plots" / "volcano.png").stat().st_size
    assert json.loads((out / "settings.json").read_text())["cells"] == shifts.n_obs


def test_an_h5ad_is_read_as_predict_reads_it_and_gives_the_run_cells_results(trained_runs, cohort, tmp_path):
    canonical = tmp_path / "cells.h5ad"
    shutil.copyfile(cohort(trained_runs[0]), canonical)
    where = ["label=Tumor", "donor=KUL01"]
    from_file = perturb(trained_runs[0], "Normal", canonical, where=where, genes="all", min_cells=5,
                        gene_ids=GeneIds(ensembl_key="ensembl_id"), progress=False)
    assert from_file.parent == canonical.with_name(f"{canonical.stem}_perturb")
    from_run = perturb(trained_runs[0], "Normal", where=where, min_cells=5, out_dir=tmp_path / "run", progress=False)
    file_cells, run_cells = ad.read_h5ad(from_file / "shifts.h5ad"), ad.read_h5ad(from_run / "shifts.h5ad")
    assert sorted(file_cells.obs_names) == sorted(run_cells.obs_names)
    assert list(file_cells.var_names) == list(run_cells.var_names)
    run_cells = run_cells[file_cells.obs_names]
    np.testing.assert_allclose(file_cells.X.toarray(), run_cells.X.toarray(), atol=1e-6)


@pytest.mark.parametrize("arguments", [
    ["--goal", "Normal", "--genes", "ENSG00000000000"],
    ["--goal", "Normal", "--where", "colour=red"],
    ["--goal", "Normal", "--where", "donor=KUL99"],
    ["--goal", "Healthy"],
    ["--goal", "Normal", "--max-cells", "0"],
    ["--goal", "Normal", "--max-cells", "-3", "--genes", "ENSG00000000001"],
    ["--goal", "Normal", "--min-cells", "-1"],
    ["--goal", "Normal", "--genes", "/no/such/genes.txt"],
])
def test_bad_inputs_are_one_line_exit_2_nothing_written(trained_runs, tmp_path, capsys, arguments):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as raised:
        cli.main(["perturb", str(trained_runs[0]), "--out", str(out), *arguments])
    assert raised.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error
    named = {"--max-cells": "--max-cells", "--min-cells": "--min-cells", "/no/such/genes.txt": "no such file"}
    assert all(shown in error for option, shown in named.items() if option in arguments)
    assert not list(tmp_path.iterdir())  # no output, temporary folder or lock file left


@pytest.mark.slow
def test_deleting_the_tumour_programme_lowers_tumour_probability(programme_run, tmp_path):
    out = perturb(programme_run, "Normal", where=["label=Tumor"], out_dir=tmp_path / "p", progress=False)
    perturb_auroc = programme_auroc(pd.read_csv(out / "genes.csv"), "mean_delta_Tumor", -1.0)
    print(f"programme AUROC: perturb {perturb_auroc:.3f}")
    assert perturb_auroc >= 0.8


def test_a_second_perturb_into_a_folder_being_written_is_refused(trained_runs, tmp_path):
    out = tmp_path / "out"
    with output_folder(out, "perturb"):  # another perturb, still writing
        with pytest.raises(InputError, match=r"out: being written by perturb \(pid"):
            perturb(trained_runs[0], "Normal", where=["label=Tumor"], out_dir=out, progress=False)
    assert [path.name for path in out.iterdir()] == [WRITTEN]  # the first writer's (empty) output alone


@pytest.mark.slow
@pytest.mark.parametrize("signal_sent", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_writing_leaves_the_previous_output_whole(trained_runs, tmp_path, signal_sent):
    """A perturb stopped between two of its files (SIGTERM, Ctrl-C) leaves the previous complete output byte for
    byte, no temporary folder or lock, and says so in one line (exit 143 / 130)."""
    out = tmp_path / "out"
    perturb(trained_runs[0], "Normal", where=["label=Tumor"], out_dir=out, progress=False)
    before = file_hashes(out)
    marker = tmp_path / "writing"
    process = run_script(str(HELPERS / "pause_writing.py"), str(marker), "perturb", str(trained_runs[0]), "--goal",
                         "Border", "--perturb", "overexpress", "--where", "label=Tumor", "--out", str(out), wait=False,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(marker, process)
    process.send_signal(signal_sent)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal_sent, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == str(Interrupted(signal_sent, STOPPED.format(command="perturb")))
    assert "Traceback" not in stderr
    assert file_hashes(out) == before
    # the perturbations done are kept for --resume (every chunk: it stopped while writing the outputs)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "out.shard-0-of-1", "writing"]
    assert (tmp_path / "out.shard-0-of-1" / "done.json").is_file()


def file_hashes(folder):
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def chosen_cells(run_dir: Path, max_cells: int, seed: int = 0):
    """The model and the run's validation and test Tumor cells that ``--where label=Tumor --max-cells`` draws."""
    model = TrainedClassifier.load(run_dir)
    return model, select_cells(model, run_dir, None, ["label=Tumor"], max_cells, seed, GeneIds(), None)


def perturbed(run_dir: Path, out: Path, *arguments: str) -> tuple[ad.AnnData, pd.DataFrame, dict]:
    """``geneformer-colon perturb RUN_DIR --goal Normal --where label=Tumor ARGUMENTS``: its shifts.h5ad, genes.csv
    and settings.json."""
    cli.main(["perturb", str(run_dir), "--goal", "Normal", "--where", "label=Tumor", "--out", str(out), *arguments])
    return (ad.read_h5ad(out / "shifts.h5ad"), pd.read_csv(out / "genes.csv"),
            json.loads((out / "settings.json").read_text()))


def assert_one_at_a_time(model: TrainedClassifier, cells, shifts: ad.AnnData, gene_tokens: dict[str, np.ndarray],
                         kind: str) -> None:
    """Every value of shifts.h5ad (the change of P(Normal)) is that cell's pass with those genes perturbed, minus its
    unperturbed pass; a cell with nothing to perturb has none."""
    base = model.apply(cells.tokens, cells.rows)[0]
    normal = model.class_names.index("Normal")
    values = shifts.X.toarray()
    measured = np.zeros_like(values, dtype=bool)
    coo = shifts.X.tocoo()
    measured[coo.row, coo.col] = True
    rows = shifts.obs_names.get_indexer(cells.obs.index)
    for index, (cell, row) in enumerate(zip(cells.rows, rows)):
        tokens = np.asarray(cells.tokens.cell_tokens(int(cell)), dtype=np.int64)
        for column, name in enumerate(shifts.var_names):
            if kind == "delete" and not np.isin(gene_tokens[name], tokens).any():
                assert not measured[row, column], (row, name)
                continue
            expected = one_at_a_time(model, tokens, gene_tokens[name], kind)[normal] - base[index, normal]
            assert measured[row, column], (row, name)
            np.testing.assert_allclose(values[row, column], expected, atol=1e-5)


def test_overexpress_moves_each_listed_gene_to_the_front_of_every_cell(trained_runs, tmp_path):
    run_dir = trained_runs[0]
    model, choice = chosen_cells(run_dir, 4)
    cells = choice.cells
    present = [set(cells.tokens.cell_tokens(int(row)).tolist()) for row in cells.rows]
    vocabulary = np.array(sorted(choice.names.token_of.values()))
    everywhere = next(token for token in vocabulary if all(token in genes for genes in present))
    somewhere = next(token for token in vocabulary if 0 < sum(token in genes for genes in present) < len(present))
    names = list(choice.names.ids(np.array([everywhere, somewhere])))
    shifts, table, settings = perturbed(run_dir, tmp_path / "up", "--max-cells", "4", "--perturb", "overexpress",
                                        "--genes", ",".join(names))
    assert settings["perturb"] == "overexpress" and sorted(table["ensembl_id"]) == sorted(names)
    assert (table["n_cells"] == 4).all()  # a cell without the gene has it inserted, so every cell counts
    assert_one_at_a_time(model, cells, shifts, {name: np.array([choice.names.token_of[name]]) for name in names},
                         "overexpress")


def test_a_gene_set_is_perturbed_at_once_as_one_row(trained_runs, tmp_path):
    run_dir = trained_runs[0]
    model, choice = chosen_cells(run_dir, 4)
    first = choice.cells.tokens.cell_tokens(int(choice.cells.rows[0]))
    members = list(choice.names.ids(first[[0, 5, 10]]))  # genes of the first cell, at three ranks
    gene_set = tmp_path / "stem_genes.txt"
    gene_set.write_text("# three genes\n" + "\n".join(members) + "\n")
    shifts, table, settings = perturbed(run_dir, tmp_path / "set", "--max-cells", "4", "--gene-set", str(gene_set))
    assert list(table["ensembl_id"]) == ["set:stem_genes"] and list(table["symbol"]) == ["3 genes"]
    assert settings["gene_sets"] == [str(gene_set)] and settings["genes"] is None
    tokens = np.array([choice.names.token_of[name] for name in members])
    assert_one_at_a_time(model, choice.cells, shifts, {"set:stem_genes": tokens}, "delete")


def test_max_cells_draws_that_many_of_the_chosen_cells_by_the_seed(trained_runs, tmp_path):
    run_dir = trained_runs[0]
    predictions = pd.concat([pd.read_csv(run_dir / "predictions" / f"{split}.csv") for split in ("val", "test")])
    tumour = set(predictions.loc[predictions["true"] == "Tumor", "cell_id"])
    drawn = {}
    for seed in (0, 1):
        shifts, _, settings = perturbed(run_dir, tmp_path / str(seed), "--max-cells", "5", "--seed", str(seed),
                                        "--genes", "all", "--min-cells", "5")
        assert settings["cells"] == shifts.n_obs == 5 < len(tumour) and set(shifts.obs_names) <= tumour
        drawn[seed] = set(shifts.obs_names)
        assert drawn[seed] == set(chosen_cells(run_dir, 5, seed)[1].cells.obs.index)
    assert drawn[0] != drawn[1]


def test_a_cv_runs_fold_is_perturbed_on_its_own_cells(two_fold_cv_run, tmp_path):
    fold = two_fold_cv_run / "folds" / "KUL19"
    out = tmp_path / "fold"
    cli.main(["perturb", str(two_fold_cv_run), "--fold", "KUL19", "--goal", "Normal", "--max-cells", "8", "--genes",
              "all", "--min-cells", "4", "--out", str(out)])
    assert json.loads((out / "settings.json").read_text())["model"] == str(fold)
    donors = json.loads((fold / "metrics.json").read_text())["donors"]
    assert set(ad.read_h5ad(out / "shifts.h5ad").obs["donor"]) == {*donors["val"], *donors["test"]}


def test_max_tokens_bounds_every_pass_and_changes_no_result(trained_runs):
    model = TrainedClassifier.load(trained_runs[0])
    choice = select_cells(model, trained_runs[0], None, ["label=Tumor"], 3, 0, GeneIds(), None)
    columns = choose_columns(choice.names, choice.cells, "all", (), 2, False)
    centroid = np.ones(model.hidden_size, np.float32)
    positions = np.arange(len(choice.cells.rows))
    passes = []
    infer = model.infer

    def recorded(input_ids, attention_mask, device="cpu"):
        passes.append(input_ids.numel())
        return infer(input_ids, attention_mask, device)

    plain = Perturber(model, "delete", centroid, batch_size=64).run(choice.cells, positions, columns)
    model.infer = recorded
    longest = int(choice.cells.tokens.lengths[choice.cells.rows].max())
    bounded = Perturber(model, "delete", centroid, batch_size=64, max_tokens=3 * (longest + 1)).run(
        choice.cells, positions, columns)
    assert max(passes) <= 3 * (longest + 1) and len(passes) > 3 * len(positions)
    for key in ("cell", "column"):
        np.testing.assert_array_equal(bounded[key], plain[key])
    np.testing.assert_allclose(bounded["delta"], plain["delta"], atol=1e-6)
