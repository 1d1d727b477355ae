"""`python baseline.py`: naive Bayes on the training split, in the training run's format and metrics."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from helpers.runs import metrics_of
from helpers.tiny import CLASSES, compose_tiny
from hydra.utils import instantiate
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.naive_bayes import MultinomialNB

from geneformer_colon.jobs.baseline import run_baseline
from geneformer_colon.report.compare import compare_runs
from geneformer_colon.report.history import run_history


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory, shared_dirs) -> Path:
    """`python baseline.py experiment=colon6` (composed as Hydra does) on the tiny data the trained runs use."""
    out = tmp_path_factory.mktemp("baseline")
    record = run_baseline(compose_tiny(out, shared_dirs, "experiment=colon6", config_name="baseline"))
    assert record == metrics_of(out / "colon6-naive_bayes")
    return out / "colon6-naive_bayes"


def test_a_run_directory_in_the_training_format(baseline_run, trained_runs):
    trained = trained_runs[0]
    for name in ("config.yaml", "metrics.json", "history.md", "predictions/val.csv", "predictions/test.csv",
                 "plots/confusion_val.png", "plots/confusion_test.png"):
        assert (baseline_run / name).is_file(), name
    metrics, reference = metrics_of(baseline_run), metrics_of(trained)
    assert list(metrics) == list(reference)
    assert metrics["kind"] == "baseline" and reference["kind"] == "train"
    for split in ("val", "test"):
        assert list(metrics[split]) == list(reference[split])
        assert list(pd.read_csv(baseline_run / "predictions" / f"{split}.csv").columns) == \
            list(pd.read_csv(trained / "predictions" / f"{split}.csv").columns)
    assert metrics["run_name"] == "colon6-naive_bayes"
    assert (metrics["status"], metrics["epochs"], metrics["best_epoch"]) == ("finished", [], None)
    assert set(metrics["success"]) == {"val/macro_f1", "test/macro_f1"}


@pytest.mark.parametrize("split", ["val", "test"])
def test_metrics_equal_scikit_learn_on_its_predictions(baseline_run, split):
    metrics = metrics_of(baseline_run)[split]
    table = pd.read_csv(baseline_run / "predictions" / f"{split}.csv")
    truth = table["true"].map(CLASSES.index).to_numpy()
    probabilities = table[[f"prob_{name}" for name in CLASSES]].to_numpy()
    predicted = table["predicted"].map(CLASSES.index).to_numpy()
    assert (predicted == probabilities.argmax(1)).all()
    assert metrics["accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-4)
    assert metrics["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"), abs=1e-4)
    assert metrics["macro_auroc"] == pytest.approx(
        roc_auc_score(truth, probabilities, multi_class="ovr", average="macro"), abs=1e-4)
    precision, recall, f1, _ = precision_recall_fscore_support(truth, predicted, labels=[0, 1, 2], zero_division=0)
    for index, name in enumerate(CLASSES):
        assert metrics[f"precision/{name}"] == pytest.approx(precision[index], abs=1e-4)
        assert metrics[f"recall/{name}"] == pytest.approx(recall[index], abs=1e-4)
        assert metrics[f"f1/{name}"] == pytest.approx(f1[index], abs=1e-4)
    assert metrics["confusion_matrix"] == confusion_matrix(truth, predicted, labels=[0, 1, 2]).tolist()


def test_the_same_cells_and_labels_as_training(baseline_run, trained_runs):
    for split, donor in (("val", "KUL19"), ("test", "KUL01")):
        baseline = pd.read_csv(baseline_run / "predictions" / f"{split}.csv").set_index("cell_id")
        trained = pd.read_csv(trained_runs[0] / "predictions" / f"{split}.csv").set_index("cell_id")
        assert sorted(baseline.index) == sorted(trained.index)
        assert (baseline["true"] == trained.loc[baseline.index, "true"]).all()
        assert set(baseline["donor"]) == {donor}


def test_filters_apply_and_the_model_is_naive_bayes_on_normalised_counts(tmp_path, shared_dirs):
    """Epithelial cells, Normal vs Tumor: refit by hand on the canonical AnnData, same probabilities."""
    cfg = compose_tiny(tmp_path, shared_dirs, "experiment=colon6", "data.cell_types=['Epithelial cells']",
                       "data.labels=[Normal,Tumor]", config_name="baseline")
    run_baseline(cfg)
    predictions = pd.read_csv(tmp_path / "colon6-naive_bayes" / "predictions" / "val.csv")
    assert set(predictions["cell_type"]) == {"Epithelial cells"}
    assert set(predictions["true"]) == {"Normal", "Tumor"}

    adata = ad.read_h5ad(instantiate(cfg.data.source).canonical(cfg.paths.cache_dir))
    kept = adata.obs["cell_type"].eq("Epithelial cells") & adata.obs["label"].isin(["Normal", "Tumor"])
    train = kept & ~adata.obs["donor"].isin(["KUL19", "KUL01"])
    counts = adata.X.toarray().astype(np.float64)
    features = np.log1p(counts / adata.obs["n_counts"].to_numpy()[:, None] * 10_000)
    labels = adata.obs["label"].map({"Normal": 0, "Tumor": 1}).to_numpy()
    model = MultinomialNB().fit(features[train.to_numpy()], labels[train.to_numpy()])
    rows = adata.obs_names.get_indexer(predictions["cell_id"])
    assert sorted(predictions["cell_id"]) == sorted(adata.obs_names[kept & adata.obs["donor"].eq("KUL19")])
    np.testing.assert_allclose(predictions[["prob_Normal", "prob_Tumor"]].to_numpy(),
                               model.predict_proba(features[rows]), atol=1e-9)


def test_compare_and_history_read_it_like_any_run(baseline_run, trained_runs, tmp_path):
    frame = compare_runs([trained_runs[0], baseline_run], tmp_path).frame
    assert list(frame["status"]) == ["finished", "finished"]
    row = frame[frame["run"].str.endswith("/colon6-naive_bayes")].iloc[0]
    assert row["val_macro_f1"] == pytest.approx(metrics_of(baseline_run)["val"]["macro_f1"])
    assert pd.isna(row["best_epoch"])
    entry = run_history(baseline_run)
    assert "naive Bayes" in entry and "**Final metrics**" in entry and "_No epochs recorded._" in entry
