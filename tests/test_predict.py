"""A trained model outside the framework: predict any h5ad, embed, export to Hugging Face, bad inputs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import yaml
from conftest import run_script
from transformers import BertModel

from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.cli import verbs as cli
from geneformer_colon.common.errors import InputError
from geneformer_colon.jobs.export import export_run
from geneformer_colon.jobs.predict import GeneIds, predict_h5ad
from geneformer_colon.model.module import CellClassifier

CLASSES = ["Normal", "Border", "Tumor"]


def canonical_cells(run_dir: Path) -> ad.AnnData:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return ad.read_h5ad(next((Path(config["paths"]["cache_dir"]) / "ingest").glob("*.h5ad")))


@pytest.fixture(scope="module")
def new_cells(trained_runs, tmp_path_factory) -> Path:
    """The held-out test donor's cells as another lab would hand them in: genes in another order, indexed by
    Ensembl id, raw counts in a layer and log-normalised values in X, no label or donor column."""
    cells = canonical_cells(trained_runs[0])
    cells = cells[cells.obs["donor"] == "KUL01"].copy()
    cells = cells[:, cells.var["ensembl_id"] != ""].copy()
    cells = cells[:, cells.var_names[::-1]].copy()
    counts = sp.csr_matrix(cells.X)
    normalised = counts.multiply(1e4 / np.asarray(counts.sum(1))).tocsr().log1p().astype(np.float32)
    adata = ad.AnnData(X=normalised, layers={"counts": counts},
                       obs=pd.DataFrame({"batch": "lab2", "n_counts": cells.obs["n_counts"]}, index=cells.obs_names),
                       var=pd.DataFrame(index=cells.var["ensembl_id"].astype(str).to_numpy()))
    path = tmp_path_factory.mktemp("new") / "new_cells.h5ad"
    adata.write_h5ad(path)
    return path


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
    assert list(predicted.obs.columns) == ["batch", "n_counts", "gfc_label"]
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


def assert_probabilities_are_the_runs(predicted: ad.AnnData, run_dir: Path) -> None:
    """obsm["gfc_probabilities"], columns in uns["gfc"]["classes"] order: the run's own test predictions."""
    run = pd.read_csv(run_dir / "predictions" / "test.csv").set_index("cell_id")
    rows = predicted.obs_names.get_indexer(run.index)
    np.testing.assert_allclose(predicted.obsm["gfc_probabilities"][rows],
                               run[[f"prob_{name}" for name in CLASSES]].to_numpy(), atol=1e-5)
    classes = list(predicted.uns["gfc"]["classes"])
    assert (predicted.obs["gfc_label"].iloc[rows].map(lambda name: CLASSES[classes.index(name)]).to_numpy()
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


@pytest.mark.parametrize("option", [["--batch-size", "0"], ["--chunk-cells", "-5"], ["--batch-size", "-5"]])
def test_predict_counts_below_one_are_one_line(trained_runs, new_cells, tmp_path, capsys, option):
    with pytest.raises(SystemExit) as ended:
        cli.main(["predict", str(trained_runs[0]), str(new_cells), "--out", str(tmp_path / "out.h5ad"), *option])
    assert ended.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{option[0]} is {option[1]}; give an integer >= 1" in error
    assert not (tmp_path / "out.h5ad").exists()



def test_labelled_cells_get_metrics_by_donor_and_cell_type(trained_runs, tmp_path):
    cells = canonical_cells(trained_runs[0])
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


def test_the_cohort_written_as_h5ad_is_scored_by_the_readmes_command(trained_runs, tmp_path, capsys, caplog):
    """`synth --h5ad` writes the cohort the runs trained on; predict scores each of its donors, and the donors
    the model never saw apart from its training donors, with a warning naming those."""
    cli.main(["synth", str(tmp_path / "demo"), "--cells", "480", "--genes", "300", "--h5ad"])
    cells = ad.read_h5ad(tmp_path / "demo" / "cells.h5ad")
    trained_on = canonical_cells(trained_runs[0])
    assert list(cells.obs_names) == list(trained_on.obs_names) and (cells.X != trained_on.X).nnz == 0
    out = tmp_path / "demo" / "predicted.h5ad"
    cli.main(["predict", str(trained_runs[0]), str(tmp_path / "demo" / "cells.h5ad"), "--ensembl-key", "ensembl_id",
              "--label-key", "label", "--donor-key", "donor", "--cell-type-key", "cell_type", "--out", str(out)])
    metrics = json.loads((tmp_path / "demo" / "predicted_metrics" / "metrics.json").read_text())
    assert set(metrics["test"]["by_donor"]) == set(cells.obs["donor"]) and len(metrics["test"]["by_donor"]) == 6
    assert ad.read_h5ad(out).obs["gfc_label"].isin(CLASSES).all()
    trained = json.loads((trained_runs[0] / "metrics.json").read_text())["donors"]["train"]
    held_out, seen = metrics["by_training"]["held_out"], metrics["by_training"]["seen"]
    assert seen["donors"] == sorted(trained) and held_out["donors"] == ["KUL01", "KUL19"]
    assert held_out["cells"] + seen["cells"] == metrics["cells"]["test"]
    assert held_out["macro_f1"] != seen["macro_f1"]
    warnings = [record.getMessage() for record in caplog.records
                if record.levelname == "WARNING" and record.name == "geneformer_colon.jobs.predict"]
    assert len(warnings) == 1 and ", ".join(sorted(trained)) in warnings[0] and "training data" in warnings[0]


def test_export_loads_with_transformers_alone_and_predicts_the_same(trained_runs, new_cells, tmp_path):
    run_dir = trained_runs[0]
    export = export_run(run_dir, tmp_path / "export")
    for name in ("config.json", "model.safetensors", "cell_classifier.safetensors", "cell_classifier.json",
                 "token_dictionary.pkl", "gene_median_dictionary.pkl", "README.md"):
        assert (export / name).is_file(), name
    assert "## Metrics of the run" in (export / "README.md").read_text()
    assert export_run(run_dir, export) == export  # an earlier export may be replaced, nothing else
    (export / "my_notes.txt").write_text("mine")  # a file of the user's in an earlier export: kept, or --overwrite
    with pytest.raises(InputError, match="holds my_notes.txt, not written by an export.*--overwrite"):
        export_run(run_dir, export)
    assert (export / "my_notes.txt").read_text() == "mine" and (export / "cell_classifier.json").is_file()
    assert export_run(run_dir, export, overwrite=True) == export and not (export / "my_notes.txt").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    for elsewhere in (tmp_path / "notes", run_dir, run_dir / "hf"):
        with pytest.raises(InputError):
            export_run(run_dir, elsewhere)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep" and (run_dir / "metrics.json").is_file()

    # the encoder, with transformers alone, gives the run's hidden states
    module = CellClassifier.load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt").eval()
    bert, loading = BertModel.from_pretrained(export, add_pooling_layer=False, output_loading_info=True)
    assert not any(loading.values()), loading  # every weight there, none missing or unexpected
    bert.eval()
    assert bert.config.id2label == {0: "Normal", 1: "Border", 2: "Tumor"}
    ids = torch.randint(4, module.encoder.bert.config.vocab_size, (3, 20))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(bert(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   module.encoder.bert(input_ids=ids, attention_mask=mask).last_hidden_state)

    from_run, from_export = tmp_path / "run.h5ad", tmp_path / "export.h5ad"
    predict_h5ad(TrainedClassifier.load(run_dir), new_cells, from_run, layer="counts")
    predict_h5ad(TrainedClassifier.load(export), new_cells, from_export, layer="counts")
    np.testing.assert_allclose(ad.read_h5ad(from_export).obsm["gfc_probabilities"],
                               ad.read_h5ad(from_run).obsm["gfc_probabilities"], atol=1e-6)


def test_embed_draws_the_donor_shift_and_scores_it(trained_runs, new_cells, tmp_path, capsys):
    cli.main(["embed", str(trained_runs[0]), "--out", str(tmp_path / "embed")])
    assert "silhouette by label" in capsys.readouterr().out
    scores = json.loads((tmp_path / "embed" / "silhouette.json").read_text())
    assert scores["cells"] > 50 and all(np.isfinite(value) for value in scores["silhouette"].values())
    for colour in ("donor", "label", "predicted", "cell_type"):
        assert (tmp_path / "embed" / f"umap_{colour}.png").stat().st_size > 10_000, colour
    embedded = ad.read_h5ad(tmp_path / "embed" / "embedding.h5ad")
    assert set(embedded.obs["donor"]) == {"KUL19", "KUL01"} and embedded.obsm["X_umap"].shape[1] == 2

    from geneformer_colon.jobs.embed import embed

    of_file = embed(trained_runs[0], new_cells, tmp_path / "file", colours=["predicted", "batch"], layer="counts")
    assert of_file["cells"] == ad.read_h5ad(new_cells).n_obs and (tmp_path / "file" / "umap_batch.png").is_file()


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
