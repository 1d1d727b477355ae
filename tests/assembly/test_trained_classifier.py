"""A trained classifier outside training (trained_classifier.py): loaded from a run or an export quietly; a CV run
loaded as the ensemble of its folds (predict, embed and export alike), or one fold where the folds' dictionaries
differ."""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pytest

from geneformer_colon.assembly.trained_classifier import FoldEnsemble, TrainedClassifier
from geneformer_colon.common.errors import InputError
from geneformer_colon.data.dictionaries import GeneDictionaries
from geneformer_colon.jobs.export import export_run
from geneformer_colon.jobs.predict import GeneIds, predict_h5ad
from geneformer_colon.runs.layout import RunLayout


def test_loading_an_export_is_quiet(logged_cv_run, tmp_path, capfd):
    export = export_run(logged_cv_run[0] / "folds" / "KUL01", tmp_path / "export")
    capfd.readouterr()
    TrainedClassifier.load(export)
    assert "not sharded" not in capfd.readouterr().err  # transformers' tensor-parallel line, once 900 characters


def test_a_cv_run_predicts_exports_and_embeds_as_the_ensemble_of_its_folds(two_fold_cv_run, cohort, tmp_path):
    cells = cohort(two_fold_cv_run)
    genes = GeneIds("ensembl_id")

    def predicted(model: TrainedClassifier, name: str) -> ad.AnnData:
        predict_h5ad(model, cells, tmp_path / f"{name}.h5ad", genes=genes)
        return ad.read_h5ad(tmp_path / f"{name}.h5ad")

    ensemble = TrainedClassifier.load(two_fold_cv_run)
    assert isinstance(ensemble, FoldEnsemble) and ensemble.origin["folds"] == ["KUL01", "KUL19"]
    both = predicted(ensemble, "ensemble")
    folds = [predicted(TrainedClassifier.load(two_fold_cv_run, fold), fold) for fold in ("KUL01", "KUL19")]
    probabilities = "gfc_probabilities"
    np.testing.assert_allclose(both.obsm[probabilities], np.mean([fold.obsm[probabilities] for fold in folds], axis=0),
                               atol=1e-6)
    np.testing.assert_allclose(both.obsm["X_gfc"], np.hstack([fold.obsm["X_gfc"] for fold in folds]), atol=1e-5)

    export = export_run(two_fold_cv_run, tmp_path / "export")
    card = (export / "README.md").read_text()
    assert "an ensemble of 2" in card and "| KUL01 |" in card and "| KUL19 |" in card
    from_export = predicted(TrainedClassifier.load(export), "from_export")
    np.testing.assert_allclose(from_export.obsm[probabilities], both.obsm[probabilities], atol=1e-5)
    with pytest.raises(InputError, match="no fold 'KUL77'; choose one of KUL01, KUL19"):
        TrainedClassifier.load(two_fold_cv_run, "KUL77")


def test_folds_with_their_own_dictionaries_are_not_averaged_but_one_can_be_chosen(two_fold_cv_run, tmp_path):
    """As when each fold derives its dictionaries from its own training cells (the embedded default)."""
    mixed = tmp_path / "mixed"
    shutil.copytree(two_fold_cv_run / "folds", mixed / "folds")
    own = RunLayout(mixed / "folds" / "KUL19").dictionaries
    dictionaries = GeneDictionaries.load_directory(own)
    gene = next(iter(dictionaries.median))
    dictionaries.median[gene] *= 2
    dictionaries.save(own)
    with pytest.raises(InputError, match=r"different gene dictionaries .* use one fold with --fold \(one of KUL01, "):
        TrainedClassifier.load(mixed)
    assert TrainedClassifier.load(mixed, "KUL19").origin["trained_on"]
