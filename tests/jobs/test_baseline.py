"""`python baseline.py`: the baselines on the training split, in the training run's format and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from helpers.runs import metrics_of
from helpers.tiny import CLASSES, TINY_ENCODER, compose_tiny, compose_train
from hydra.utils import instantiate
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.naive_bayes import MultinomialNB
from sklearn.preprocessing import StandardScaler

from geneformer_colon.assembly.builders import build_datamodule
from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.cli.override_checks import check_command_line
from geneformer_colon.common.errors import InputError, input_error_in
from geneformer_colon.jobs import donor_cv
from geneformer_colon.jobs.baseline import frozen_encoder, run_baseline, split_embeddings
from geneformer_colon.jobs.embed import run_cells
from geneformer_colon.jobs.train import train
from geneformer_colon.report.compare import compare_runs
from geneformer_colon.report.history import run_history
from geneformer_colon.runs.config import CONF_DIR
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.reading import read_run


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
    assert "the `naive_bayes` baseline" in entry and "**Final metrics**" in entry and "_No epochs recorded._" in entry


@pytest.fixture(scope="module")
def h5ad_cohorts(trained_runs, cohort, tmp_path_factory) -> dict[str, Path]:
    """The tiny cohort as an .h5ad, and two copies whose validation and test donors (KUL19, KUL01) have their labels
    permuted: ``relabelled`` (nothing else), ``changed`` (the test donor's counts of every other gene tripled as
    well, which changes its normalised counts and its genes' ranks). What a baseline learns must not change with
    either."""
    cells = ad.read_h5ad(cohort(trained_runs[0]))
    folder = tmp_path_factory.mktemp("baseline_cohorts")
    cells.write_h5ad(folder / "plain.h5ad")
    for donor in ("KUL19", "KUL01"):
        held_out = cells.obs["donor"].eq(donor).to_numpy()
        cells.obs.loc[held_out, "label"] = np.random.default_rng(1).permutation(
            cells.obs.loc[held_out, "label"].to_numpy())
    cells.write_h5ad(folder / "relabelled.h5ad")
    test = sp.diags(cells.obs["donor"].eq("KUL01").to_numpy().astype(np.int64))
    every_other = sp.diags((np.arange(cells.n_vars) % 2 == 0).astype(np.int64))
    cells.X = sp.csr_matrix(cells.X + 2 * (test @ cells.X @ every_other), dtype=cells.X.dtype)
    cells.obs["n_counts"] = np.asarray(cells.X.sum(1)).ravel()
    cells.write_h5ad(folder / "changed.h5ad")
    return {name: folder / f"{name}.h5ad" for name in ("plain", "relabelled", "changed")}


def h5ad_baseline(path: Path, out: Path, cache: Path, *overrides: str) -> Path:
    """``python baseline.py data=h5ad ...`` on ``path``; its run directory."""
    run_dir = out / "run"
    run_baseline(compose_train([f"paths.output_dir={out}", f"paths.cache_dir={cache}", "data=h5ad",
                                f"data.source.path={path}", "model.tokenizer.input_size=128", "logger=csv",
                                f"paths.run_dir={run_dir}", *overrides], config_name="baseline"))
    return run_dir


def test_logreg_is_celltypists_recipe_on_the_training_donors(h5ad_cohorts, tmp_path, shared_dirs):
    """Highly variable genes of the training cells, scaled and clipped at 10, L2 logistic regression: the run's
    probabilities are those of the same recipe built by hand with scanpy and scikit-learn."""
    run_dir = h5ad_baseline(h5ad_cohorts["plain"], tmp_path, shared_dirs["cache"], "baseline=logreg",
                            "baseline.n_genes=60", "baseline.C=0.5")
    assert metrics_of(run_dir)["run_name"] == "default-logreg"
    adata = ad.read_h5ad(h5ad_cohorts["plain"])
    normalised = adata.copy()
    sc.pp.normalize_total(normalised, target_sum=10_000)
    sc.pp.log1p(normalised)
    train = ~adata.obs["donor"].isin(["KUL19", "KUL01"]).to_numpy()
    chosen = sc.pp.highly_variable_genes(normalised[train].copy(), n_top_genes=60, flavor="seurat",
                                         inplace=False)["highly_variable"].to_numpy()
    values = normalised.X[:, chosen].toarray().astype(np.float64)
    scaler = StandardScaler().fit(values[train])
    model = LogisticRegression(C=0.5, max_iter=1000, random_state=42).fit(
        np.minimum(scaler.transform(values[train]), 10), adata.obs["label"].map(CLASSES.index).to_numpy()[train])
    for split in ("val", "test"):
        predictions = pd.read_csv(run_dir / "predictions" / f"{split}.csv")
        rows = adata.obs_names.get_indexer(predictions["cell_id"])
        np.testing.assert_allclose(predictions[[f"prob_{name}" for name in CLASSES]].to_numpy(),
                                   model.predict_proba(np.minimum(scaler.transform(values[rows]), 10)), atol=1e-6)


def test_a_baseline_is_calibrated_and_gets_conformal_sets_like_a_training_run(h5ad_cohorts, tmp_path, shared_dirs):
    """calibration=temperature on a baseline: fitted on the validation donor's probabilities (its NLL falls there),
    the calls unchanged, the calibrated, abstention and conformal figures in metrics.json, calibration.json written;
    a probe of embeddings also gets the kNN score."""
    runs = {method: h5ad_baseline(h5ad_cohorts["plain"], tmp_path / method, shared_dirs["cache"], "baseline=logreg",
                                  "baseline.n_genes=60", f"calibration={method}") for method in ("none", "temperature")}
    plain, calibrated = (metrics_of(runs[method]) for method in ("none", "temperature"))
    for split in ("val", "test"):
        assert calibrated[split]["macro_f1"] == plain[split]["macro_f1"] and "calibrated" not in plain[split]
    assert calibrated["val"]["calibrated"]["nll"] < calibrated["val"]["nll"]
    assert calibrated["test"]["conformal"]["alpha"] == 0.1 and calibrated["test"]["conformal"]["coverage"] > 0
    assert plain["test"]["conformal"]["mean_set_size"] >= 1 and calibrated["test"]["abstention"]["at_80"]
    assert json.loads((runs["temperature"] / "calibration.json").read_text())["method"] == "temperature"
    frame = compare_runs(list(runs.values()), tmp_path / "compared").frame.set_index("run")
    assert frame.loc["temperature/run", "test_calibrated_ece"] == pytest.approx(calibrated["test"]["calibrated"]["ece"])
    assert np.isnan(frame.loc["none/run", "test_calibrated_ece"])

    probe = h5ad_baseline(h5ad_cohorts["plain"], tmp_path / "probe", shared_dirs["cache"], "baseline=frozen_probe",
                          *TINY_ENCODER)
    test = pd.read_csv(probe / "predictions" / "test.csv")
    assert test["uncertainty_knn"].notna().all() and test["uncertainty_energy"].isna().all()
    assert "knn" in metrics_of(probe)["test"]["abstention"]["aurc_by_score"]


# Each baseline's settings on the tiny cohort (scANVI: a few epochs of a small model).
TINY_SCANVI = ["baseline=scanvi", "baseline.n_genes=100", "baseline.n_latent=4", "baseline.n_hidden=16",
               "baseline.epochs=3", "baseline.scanvi_epochs=2", "baseline.query_epochs=2"]
SETTINGS = {
    "naive_bayes": ["baseline=naive_bayes"],
    "logreg": ["baseline=logreg", "baseline.n_genes=60"],
    "pca_knn": ["baseline=pca_knn", "baseline.n_genes=60", "baseline.n_pcs=10"],
    "frozen_probe": ["baseline=frozen_probe", *TINY_ENCODER],
    "scanvi": TINY_SCANVI,
    "scanvi_transductive": [*TINY_SCANVI, "baseline.transductive=true"],
}
SLOW = {"scanvi", "scanvi_transductive"}


@pytest.mark.parametrize("baseline", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
                                      for name in SETTINGS])
def test_held_out_labels_and_cells_never_reach_a_fit(h5ad_cohorts, tmp_path, shared_dirs, baseline, monkeypatch):
    """The validation and test donors' labels permuted before training, and the test donor's counts changed: the
    genes, scaling, components and classifier learnt are the same, so the validation donor's predictions are
    identical, and the test donor's differ with its counts alone. scANVI with transductive=true has the held-out
    cells, so its cohort has the labels permuted alone: both donors' predictions are identical (but the test donor's
    conformal sets, which are calibrated on the validation donor's labels by design, as a calibration is)."""
    monkeypatch.setattr(Figure, "savefig", lambda figure, path, **_: Path(path).write_bytes(b""))  # time: not drawn
    changed = "relabelled" if baseline == "scanvi_transductive" else "changed"
    runs = {name: h5ad_baseline(h5ad_cohorts[name], tmp_path / name, shared_dirs["cache"], *SETTINGS[baseline])
            for name in ("plain", changed)}
    same_test = baseline == "scanvi_transductive"
    for split in ("val", "test"):
        plain, other = (pd.read_csv(runs[name] / "predictions" / f"{split}.csv") for name in runs)
        assert not plain["true"].equals(other["true"])
        if split == "val" or same_test:
            learnt = ["true", "conformal_set"] if split == "test" else ["true"]
            pd.testing.assert_frame_equal(plain.drop(columns=learnt), other.drop(columns=learnt))
        else:
            assert not plain.filter(like="prob_").equals(other.filter(like="prob_"))


@pytest.mark.parametrize(("overrides", "message"), [
    (["baseline=pca_knn", "baseline.k=100000"], "baseline.k=100000: more neighbours than the"),
    (["baseline=pca_knn", "baseline.n_pcs=5000"], "baseline.n_pcs=5000: above the"),
    (["baseline=logreg", "data.labels=[Normal]"], "a classifier needs two or more"),
    (["baseline=frozen_probe", "baseline.probe=knn", "baseline.k=100000"], "baseline.k=100000: more neighbours"),
    (["baseline=frozen_probe", "baseline.probe=svm"], "baseline.probe=svm: no such probe; set it to logreg or knn"),
])
def test_settings_the_training_cells_cannot_carry_are_one_line_and_write_nothing(tmp_path, shared_dirs, overrides,
                                                                                 message):
    with pytest.raises(Exception) as refused:  # noqa: PT011  (Hydra wraps what instantiate raises)
        run_baseline(compose_tiny(tmp_path, shared_dirs, "experiment=colon6", *overrides, config_name="baseline"))
    assert message in str(input_error_in(refused.value))
    assert not list(tmp_path.glob("colon6-*"))


def test_an_unknown_baseline_is_one_line_naming_the_options():
    with pytest.raises(InputError, match=r"^baseline=nope: baseline has no option 'nope'; choose one of "
                                         r"frozen_probe, logreg, naive_bayes, pca_knn, scanvi$"):
        check_command_line(CONF_DIR, "baseline", ["experiment=colon6", "baseline=nope"])


def test_a_frozen_probe_embeds_as_embed_does(trained_runs, tmp_path, shared_dirs):
    """A run's best weights frozen (init_from): the probe's embeddings of the run's validation and test cells are
    those `geneformer-colon embed` computes for them."""
    run = trained_runs[0]
    cfg = compose_tiny(tmp_path, shared_dirs, "experiment=colon6", "baseline=frozen_probe", f"init_from='{run}'",
                       config_name="baseline")
    datamodule = build_datamodule(cfg)
    embeddings = split_embeddings(frozen_encoder(cfg, datamodule), datamodule, 64)
    obs, reference = run_cells(TrainedClassifier.load(run), run, 64, "cpu")
    ours = pd.DataFrame(np.concatenate([embeddings["val"], embeddings["test"]]),
                        index=pd.concat([datamodule.split_cells(split) for split in ("val", "test")])["cell_id"])
    np.testing.assert_allclose(ours.loc[obs.index].to_numpy(), reference, atol=1e-5)


@pytest.mark.slow
def test_scanvi_under_cv_is_a_complete_run_that_compare_pairs_with_colon6(tmp_path, shared_dirs):
    """scANVI (tiny, CPU) and colon6 under cv=lodo on two test donors and two seeds: every fold and seed a complete
    run directory, and `compare` pairs the two by donor, with seed noise; the seeds give scANVI different models."""
    cv = ["experiment=colon6", "cv=lodo", "cv.folds=[KUL01,KUL19]", "cv.seeds=[0,1]", "logger=csv"]
    donor_cv.run(train, compose_tiny(tmp_path, shared_dirs, *cv, "trainer.limit_train_batches=2"))
    donor_cv.run(run_baseline, compose_tiny(tmp_path, shared_dirs, *cv, *TINY_SCANVI, config_name="baseline"))
    scanvi = read_run(tmp_path / "colon6-scanvi")
    assert scanvi.cv["aggregate"]["test"]["macro_f1"]["n"] == 2
    probabilities = {}
    for donor in ("KUL01", "KUL19"):
        for seed in (0, 1):
            fold = RunLayout(tmp_path / "colon6-scanvi").fold(donor, seed).root
            assert read_run(fold).metrics["kind"] == "baseline"
            for name in ("config.yaml", "metrics.json", "history.md", "predictions/val.csv", "predictions/test.csv",
                         "plots/confusion_test.png"):
                assert (fold / name).is_file(), (fold, name)
            probabilities[donor, seed] = pd.read_csv(fold / "predictions" / "test.csv").filter(like="prob_")
    assert not probabilities["KUL01", 0].equals(probabilities["KUL01", 1])
    comparison = compare_runs([tmp_path / "colon6", tmp_path / "colon6-scanvi"], tmp_path / "compare")
    assert sorted(run.name for run in comparison.runs) == ["colon6", "colon6-scanvi"]
    (pair,) = comparison.pairs
    assert sorted(pair.donors) == ["KUL01", "KUL19"] and pair.within_seed_noise() is not None
