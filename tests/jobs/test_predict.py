"""Predict any h5ad with a trained classifier (predict.py): what the run predicted, written into a copy of the file;
labelled cells scored by donor and cell type; bad inputs in one line (embed: test_embed.py; export: test_export.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from helpers.processes import run_script
from helpers.tiny import CLASSES, TINY_SYNTH

from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.cli import verbs as cli
from geneformer_colon.jobs.export import export_run
from geneformer_colon.jobs.predict import GeneIds, predict_h5ad


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_predict_writes_what_the_run_predicted_into_a_copy_of_the_file(trained_runs, new_cells, tmp_path, capsys):
    run_dir = trained_runs[0]
    before = digest(new_cells)
    out = tmp_path / "predicted.h5ad"
    cli.main(["predict", str(run_dir), str(new_cells), "--out", str(out), "--layer", "counts"])
    assert "predicted" in capsys.readouterr().out
    assert digest(new_cells) == before  # the input is never written to

    predicted = ad.read_h5ad(out)
    original = ad.read_h5ad(new_cells)
    assert list(predicted.obs_names) == list(original.obs_names) and predicted.n_vars == original.n_vars
    assert (predicted.layers["counts"] != original.layers["counts"]).nnz == 0
    assert list(predicted.obs.columns) == ["batch", "n_counts", "gfc_label", "gfc_uncertainty"]
    assert predicted.obsm["X_gfc"].shape == (original.n_obs, 32) and np.isfinite(predicted.obsm["X_gfc"]).all()
    assert predicted.uns["gfc"]["run_dir"] == str(run_dir) and list(predicted.uns["gfc"]["classes"]) == CLASSES
    assert_probabilities_are_the_runs(predicted, run_dir)

    # read a chunk of 7 cells at a time: the same result (other batches: float rounding at most)
    small = tmp_path / "chunked.h5ad"
    predict_h5ad(TrainedClassifier.load(run_dir), new_cells, small, layer="counts", chunk_cells=7)
    chunked = ad.read_h5ad(small)
    np.testing.assert_allclose(chunked.obsm["gfc_probabilities"], predicted.obsm["gfc_probabilities"], atol=1e-6)
    np.testing.assert_allclose(chunked.obsm["X_gfc"], predicted.obsm["X_gfc"], atol=1e-5)
    assert (chunked.obs["gfc_label"] == predicted.obs["gfc_label"]).all()


def assert_probabilities_are_the_runs(predicted: ad.AnnData, run_dir: Path, prefix: str = "gfc") -> None:
    """obsm["<prefix>_probabilities"], columns in uns[prefix]["classes"] order: the run's own test predictions."""
    run = pd.read_csv(run_dir / "predictions" / "test.csv").set_index("cell_id")
    rows = predicted.obs_names.get_indexer(run.index)
    np.testing.assert_allclose(predicted.obsm[f"{prefix}_probabilities"][rows],
                               run[[f"prob_{name}" for name in CLASSES]].to_numpy(), atol=1e-5)
    classes = list(predicted.uns[prefix]["classes"])
    assert (predicted.obs[f"{prefix}_label"].iloc[rows].map(lambda name: CLASSES[classes.index(name)]).to_numpy()
            == run["predicted"].to_numpy()).all()


def test_class_names_with_a_slash_are_written_without_a_warning(trained_runs, new_cells, tmp_path):
    """A real dataset's labels (`CD4+/CD25 T Reg`): no h5 name is made of them (a warning is an error here)."""
    model = TrainedClassifier.load(trained_runs[0])
    model.module.class_names = ["CD4+/CD25 T Reg", "Border", "Tumor/core"]
    out = tmp_path / "slashes.h5ad"
    predict_h5ad(model, new_cells, out, layer="counts")
    predicted = ad.read_h5ad(out)
    assert list(predicted.uns["gfc"]["classes"]) == model.class_names
    assert not any("/" in column for column in predicted.obs.columns)
    assert_probabilities_are_the_runs(predicted, trained_runs[0])


def test_labelled_cells_get_metrics_by_donor_and_cell_type(trained_runs, cohort, tmp_path):
    cells = ad.read_h5ad(cohort(trained_runs[0]))
    cells = cells[cells.obs["donor"].isin(["KUL01", "KUL19"])].copy()
    cells.obs = cells.obs.rename(columns={"label": "region", "donor": "patient"})
    path = tmp_path / "labelled.h5ad"
    cells.write_h5ad(path)
    out = tmp_path / "labelled_predicted.h5ad"
    predict_h5ad(TrainedClassifier.load(trained_runs[0]), path, out, genes=GeneIds(ensembl_key="ensembl_id"),
                 label_key="region", donor_key="patient", cell_type_key="cell_type")
    metrics = json.loads((tmp_path / "labelled_predicted_metrics" / "metrics.json").read_text())
    assert metrics["kind"] == "predict" and metrics["cells"]["test"] == cells.n_obs
    assert set(metrics["test"]["by_donor"]) == {"KUL01", "KUL19"} and metrics["test"]["by_cell_type"]
    table = pd.read_csv(tmp_path / "labelled_predicted_metrics" / "predictions" / "test.csv")
    assert (table["predicted"].to_numpy() == ad.read_h5ad(out).obs["gfc_label"].to_numpy()).all()


def test_the_cohort_written_as_h5ad_is_scored_by_the_readmes_command(trained_runs, cohort, tmp_path, capsys, caplog):
    """`synth --h5ad` writes the cohort the runs trained on; predict scores each of its donors, and the donors
    the model never saw apart from its validation donor (which chose its checkpoint) and its training donors, with a
    warning naming each."""
    cli.main(["synth", str(tmp_path / "demo"), *TINY_SYNTH, "--h5ad"])
    cells = ad.read_h5ad(tmp_path / "demo" / "cells.h5ad")
    trained_on = ad.read_h5ad(cohort(trained_runs[0]))
    assert list(cells.obs_names) == list(trained_on.obs_names) and (cells.X != trained_on.X).nnz == 0
    out = tmp_path / "demo" / "predicted.h5ad"
    cli.main(["predict", str(trained_runs[0]), str(tmp_path / "demo" / "cells.h5ad"), "--ensembl-key", "ensembl_id",
              "--label-key", "label", "--donor-key", "donor", "--cell-type-key", "cell_type", "--out", str(out)])
    metrics = json.loads((tmp_path / "demo" / "predicted_metrics" / "metrics.json").read_text())
    assert set(metrics["test"]["by_donor"]) == set(cells.obs["donor"]) and len(metrics["test"]["by_donor"]) == 6
    assert ad.read_h5ad(out).obs["gfc_label"].isin(CLASSES).all()
    trained = json.loads((trained_runs[0] / "metrics.json").read_text())["donors"]["train"]
    parts = metrics["by_training"]
    held_out, validation, seen = parts["held_out"], parts["validation"], parts["seen"]
    assert seen["donors"] == sorted(trained) and validation["donors"] == ["KUL19"] and held_out["donors"] == ["KUL01"]
    assert held_out["cells"] + validation["cells"] + seen["cells"] == metrics["cells"]["test"]
    assert held_out["macro_f1"] != seen["macro_f1"]
    warnings = [record.getMessage() for record in caplog.records
                if record.levelname == "WARNING" and record.name == "geneformer_colon.jobs.predict"]
    assert len(warnings) == 2 and ", ".join(sorted(trained)) in warnings[0] and "training data" in warnings[0]
    assert "KUL19" in warnings[1] and "checkpoint" in warnings[1]


def bad_predict(tmp_path: Path, model: str, adata: ad.AnnData, *options: str):
    path = tmp_path / "bad.h5ad"
    adata.write_h5ad(path)
    return run_script("-m", "geneformer_colon", "predict", model, str(path), "--out", str(tmp_path / "out.h5ad"),
                      *options)


@pytest.mark.slow  # many processes: run by make test-slow (CI too)
def test_bad_inputs_each_get_one_line_naming_the_file_and_field(trained_runs, new_cells, tmp_path):
    cells = ad.read_h5ad(new_cells)
    export = export_run(trained_runs[0], tmp_path / "export")
    other = shutil.copytree(export, tmp_path / "other_vocabulary")
    token = {f"ENSG{i:011d}": i for i in range(4, 80)} | {"<pad>": 0, "<mask>": 1}
    from geneformer_colon.data.dictionaries import GeneDictionaries

    GeneDictionaries(token, dict.fromkeys([g for g in token if g.startswith("ENSG")], 1.0)).save(other)
    fractional = cells.copy()
    fractional.layers["counts"] = fractional.layers["counts"].astype(np.float32) * 0.5
    symbols = cells.copy()
    symbols.var_names = [f"GENE{i}" for i in range(symbols.n_vars)]
    cases = [  # model, cells, options, the file the message names, what else it says
        (str(trained_runs[0]), symbols, ["--layer", "counts"], "bad.h5ad", ["none of the", "genes in the var index"]),
        (str(trained_runs[0]), cells, ["--layer", "raw"], "bad.h5ad", ["layer 'raw' missing (layers: counts)",
                                                                      "--layer"]),
        (str(trained_runs[0]), fractional, ["--layer", "counts"], "bad.h5ad",
         ["layers['counts'] holds a fractional value", "--layer"]),
        (str(other), cells, ["--layer", "counts"], str(other), ["vocab_size", "token dictionary size"]),
    ]
    for number, (model, adata, options, named, expected) in enumerate(cases):
        folder = tmp_path / str(number)
        folder.mkdir()
        result = bad_predict(folder, model, adata, *options)
        assert result.returncode == 2, (number, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in result.stderr, (number, result.stderr[-2000:])
        assert named in lines[0] and all(part in lines[0] for part in expected), (number, lines[0])
        assert not (folder / "out.h5ad").exists()


def test_symbols_mapped_by_a_gene_name_file_and_entries_named_by_the_prefix(trained_runs, cohort, tmp_path, capsys):
    """An h5ad whose genes are symbols in a var column (the index says nothing): --symbol-key names the column,
    --gene-names maps the symbols to Ensembl ids, --prefix names what predict adds."""
    cells = ad.read_h5ad(cohort(trained_runs[0]))
    cells = cells[cells.obs["donor"] == "KUL01"]
    by_symbol = ad.AnnData(X=cells.X, obs=pd.DataFrame(index=cells.obs_names),
                           var=pd.DataFrame({"gene_symbol": cells.var["symbol"].to_numpy()},
                                            index=[f"feature_{i}" for i in range(cells.n_vars)]))
    path, names = tmp_path / "symbols.h5ad", tmp_path / "gene_names.tsv"
    by_symbol.write_h5ad(path)
    known = cells.var[cells.var["ensembl_id"] != ""]
    names.write_text("symbol\tensembl_id\n" + "".join(f"{symbol}\t{gene}\n" for symbol, gene
                                                     in zip(known["symbol"], known["ensembl_id"])))
    out = tmp_path / "predicted.h5ad"
    cli.main(["predict", str(trained_runs[0]), str(path), "--gene-names", str(names), "--symbol-key", "gene_symbol",
              "--prefix", "lab2", "--out", str(out)])
    assert "predicted" in capsys.readouterr().out
    predicted = ad.read_h5ad(out)
    assert list(predicted.obs.columns) == ["lab2_label", "lab2_uncertainty"] and set(predicted.uns) == {"lab2"}
    assert set(predicted.obsm) == {"lab2_probabilities", "X_lab2"}
    assert_probabilities_are_the_runs(predicted, trained_runs[0], "lab2")
