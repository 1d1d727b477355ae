"""A run's classifier as a Hugging Face directory (export.py): loaded by transformers alone, predicting as the run
does, never writing over a user's files; its model card names the data source; a CV run's fold exported alone."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import torch
from transformers import BertModel

from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.cli import verbs as cli
from geneformer_colon.common.errors import InputError
from geneformer_colon.jobs.export import export_run
from geneformer_colon.jobs.predict import predict_h5ad
from geneformer_colon.model.module import CellClassifier


def test_export_loads_with_transformers_alone_and_predicts_the_same(trained_runs, new_cells, tmp_path):
    run_dir = trained_runs[0]
    export = export_run(run_dir, tmp_path / "export")
    for name in ("config.json", "model.safetensors", "cell_classifier.safetensors", "cell_classifier.json",
                 "token_dictionary.pkl", "gene_median_dictionary.pkl", "README.md"):
        assert (export / name).is_file(), name
    assert "## Metrics of the run" in (export / "README.md").read_text()
    assert export_run(run_dir, export) == export  # an earlier export may be replaced, nothing else
    (export / "my_notes.txt").write_text("mine")  # a file of the user's in an earlier export: kept, or --overwrite
    with pytest.raises(InputError, match="holds my_notes.txt, not written by export or changed since.*--overwrite"):
        export_run(run_dir, export)
    assert (export / "my_notes.txt").read_text() == "mine" and (export / "cell_classifier.json").is_file()
    assert export_run(run_dir, export, overwrite=True) == export and not (export / "my_notes.txt").exists()
    for name, edit in (("README.md", "# my own model card\n"), ("cell_classifier.json", "{}\n")):
        before = (export / name).read_text()
        (export / name).write_text(edit)  # an exported file edited since (the user's own card): refused, kept
        with pytest.raises(InputError, match=f"holds {name}, not written by export or changed since"):
            export_run(run_dir, export)
        assert (export / name).read_text() == edit
        (export / name).write_text(before)
    assert export_run(run_dir, export) == export  # restored as exported: replaced again
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


def test_the_model_card_and_history_name_the_data_source(logged_cv_run, tmp_path):
    fold = logged_cv_run[0] / "folds" / "KUL01"
    data = json.loads((fold / "metrics.json").read_text())["data"]
    assert data["source"] == "synthetic" and data["n_cells"] == 480 and data["generator_version"]
    card = (export_run(fold, tmp_path / "export") / "README.md").read_text()
    for text in (card, (fold / "history.md").read_text(), (logged_cv_run[0] / "history.md").read_text()):
        assert "**Data:** the embedded synthetic KUL3 look-alike, not real cells" in text
        assert "480 cells x 300 genes, seed 0" in text


def test_a_cv_runs_fold_is_exported_alone(two_fold_cv_run, tmp_path, capsys):
    out = tmp_path / "export"
    cli.main(["export", str(two_fold_cv_run), str(out), "--fold", "KUL19"])
    assert str(out) in capsys.readouterr().out
    assert (out / "cell_classifier.json").is_file() and not (out / "folds").exists()  # one model, no ensemble
    exported = TrainedClassifier.load(out).module.state_dict()
    for fold, same in (("KUL19", True), ("KUL01", False)):
        trained = TrainedClassifier.load(two_fold_cv_run, fold).module.state_dict()
        assert exported.keys() == trained.keys()
        assert all(torch.equal(exported[name], trained[name]) for name in trained) == same, fold
