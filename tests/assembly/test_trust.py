"""Which calls to trust, for a run (assembly/trust.py): what training records (calibration.json, the figures in
metrics.json, the uncertainty columns, the plots), temperature scaling of an over-confident model, predict applying
the run's calibration from the run and its export alike, abstention and conformal sets from predict, bad inputs."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from helpers.tiny import CLASSES

from geneformer_colon.assembly.trust import RunTrust, TrustAsked
from geneformer_colon.cli import verbs as cli
from geneformer_colon.common.errors import InputError
from geneformer_colon.jobs.export import export_run
from geneformer_colon.model.calibration import calibration_figures
from geneformer_colon.report.cv_summary import aggregate
from geneformer_colon.report.wandb_run import summary_values
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.reading import read_run


def test_a_trained_run_records_its_calibration_and_its_trust_figures(trained_runs):
    """Every training run fits its calibration (here none) on its validation donor and records it, with its
    validation cells' scores and training cells' embeddings; metrics.json has the figures of the probabilities
    its predictions hold, W&B and the CV summary read them (the worst fold of a lower-is-better figure is its
    highest)."""
    layout = RunLayout(trained_runs[0])
    metrics = json.loads(layout.metrics.read_text())
    trust = RunTrust.load(layout.root)
    assert trust.calibration.method == "none" and trust.fitted_on == {"donors": ["KUL19"], "cells": 67}
    assert set(trust.val_scores) == {"max_softmax", "entropy", "energy", "knn"} and len(trust.reference) > 100
    for split in ("val", "test"):
        table = pd.read_csv(layout.prediction_file(split))
        probabilities = table[[f"prob_{name}" for name in CLASSES]].to_numpy()
        targets = table["true"].map({name: i for i, name in enumerate(CLASSES)}).to_numpy()
        figures = calibration_figures(probabilities, targets)
        assert all(metrics[split][key] == pytest.approx(value, abs=1e-4) for key, value in figures.items())
        assert table["uncertainty_knn"].notna().all() and table["uncertainty_energy"].notna().all()
        for kind in ("reliability", "coverage"):
            assert layout.trust_plot(kind, split).is_file()
    assert np.allclose(trust.val_probabilities, pd.read_csv(layout.prediction_file("val"))[
        [f"prob_{name}" for name in CLASSES]].to_numpy(), atol=1e-6)
    assert metrics["test"]["conformal"]["alpha"] == 0.1 and "conformal" not in metrics["val"]
    assert summary_values(metrics)["test/ece"] == metrics["test"]["ece"]
    folds = [{"test_donor": donor, "val": {}, "test": {"ece": ece, "macro_f1": f1, "calibrated_nll": nll}}
             for donor, ece, f1, nll in (("A", 0.1, 0.5, 2.5), ("B", 0.3, 0.7, 1.5))]
    across = aggregate(folds, [])["test"]
    assert across["ece"]["worst"] == {"donor": "B", "value": 0.3} and across["macro_f1"]["worst"]["donor"] == "A"
    assert across["calibrated_nll"]["worst"]["donor"] == "A" and across["calibrated_nll"]["ci95"][1] > 1


def test_temperature_scaling_tames_an_over_confident_model_and_predict_applies_it_from_run_and_export(
        trained_runs, new_cells, tmp_path):
    """The tiny run made over-confident (its head's logits times 10: its validation log-probabilities times 10)
    gets a temperature above 1 that lowers its validation NLL and changes no call. A copy of the run given a
    fitted temperature predicts through it, from the run directory and from its export alike (1e-5)."""
    layout = RunLayout(trained_runs[0])
    saved = RunTrust.load(layout.root)
    over_confident = saved.val_probabilities ** 10 / (saved.val_probabilities ** 10).sum(1, keepdims=True)
    trust = RunTrust.fit({"method": "temperature"}, over_confident, saved.val_targets, None, None, None, ["KUL19"])
    calibrated = trust.calibration.apply(over_confident)
    assert trust.calibration.temperature > 2
    assert calibration_figures(calibrated, saved.val_targets)["nll"] < \
        calibration_figures(over_confident, saved.val_targets)["nll"]
    assert (calibrated.argmax(1) == over_confident.argmax(1)).all()

    run = shutil.copytree(layout.root, tmp_path / "run", ignore=shutil.ignore_patterns("wandb", "csv"))
    RunTrust(trust.calibration, saved.val_probabilities, saved.val_targets, saved.val_scores, saved.reference,
             fitted_on=saved.fitted_on).save(run)
    export = export_run(run, tmp_path / "export")
    predicted = {}
    for name, model in (("plain", layout.root), ("run", run), ("export", export)):
        out = tmp_path / f"{name}.h5ad"
        cli.main(["predict", str(model), str(new_cells), "--out", str(out), "--layer", "counts"])
        predicted[name] = ad.read_h5ad(out)
    expected = trust.calibration.apply(predicted["plain"].obsm["gfc_probabilities"])
    for name in ("run", "export"):
        assert np.abs(predicted[name].obsm["gfc_probabilities"] - expected).max() < 1e-5, name
        assert predicted[name].uns["gfc"]["calibration"] == "temperature"
    assert predicted["plain"].uns["gfc"]["calibration"] == "none"


def test_predict_abstains_on_a_fifth_of_the_validation_donor_and_writes_conformal_sets(trained_runs, cohort,
                                                                                      tmp_path, capsys):
    """On a labelled file of the validation donor (KUL19, whose cells set the threshold and the sets) and the test
    donor: the calls, the sets, and the metrics of how they did, the file's and each donor's."""
    cells = ad.read_h5ad(cohort(trained_runs[0]))
    cells = cells[cells.obs["donor"].isin(["KUL19", "KUL01"])].copy()
    cells.write_h5ad(tmp_path / "two_donors.h5ad")
    out = tmp_path / "abstained.h5ad"
    cli.main(["predict", str(trained_runs[0]), str(tmp_path / "two_donors.h5ad"), "--out", str(out), "--ensembl-key",
              "ensembl_id", "--abstain", "0.8", "--conformal", "0.1", "--uncertainty", "entropy", "--label-key",
              "label", "--donor-key", "donor"])
    printed = capsys.readouterr().out
    obs, uns = ad.read_h5ad(out).obs, ad.read_h5ad(out).uns["gfc"]
    kul19 = obs["donor"] == "KUL19"
    unknown = (obs["gfc_label"] == "unknown")
    assert 0.15 <= unknown[kul19].mean() <= 0.25 and obs["gfc_label"].isin([*CLASSES, "unknown"]).all()
    assert uns["abstain"]["coverage_reached"] == pytest.approx(1 - unknown.mean())
    assert f"coverage reached {1 - unknown.mean():.3f}" in printed
    assert uns["uncertainty"] == "entropy" and obs["gfc_uncertainty"].notna().all()
    assert obs["gfc_uncertainty"][~unknown].max() <= obs["gfc_uncertainty"][unknown].min()
    sets = obs["gfc_conformal_set"].astype(str).str.split("|")
    assert sets.map(lambda chosen: set(chosen) <= set(CLASSES)).all() and uns["conformal"]["alpha"] == 0.1
    covered = pd.Series([label in chosen for label, chosen in zip(obs["label"], sets)], index=obs.index)
    # the calibration cells themselves: Mondrian coverage at least 1 - alpha within each class
    assert covered[kul19].mean() >= 0.9

    test = json.loads((tmp_path / "abstained_metrics" / "metrics.json").read_text())["test"]
    probabilities = ad.read_h5ad(out).obsm["gfc_probabilities"]
    called = np.asarray(CLASSES)[probabilities.argmax(axis=1)]
    for donor, rows in (("all", np.ones(len(obs), dtype=bool)), ("KUL19", kul19), ("KUL01", ~kul19)):
        asked = test["asked"] if donor == "all" else test["by_donor"][donor]["asked"]
        answered = rows & ~unknown
        assert asked["abstain"]["coverage"] == pytest.approx(answered.sum() / rows.sum(), abs=1e-4)
        assert asked["abstain"]["accuracy"] == pytest.approx(
            np.mean(called[answered] == obs["label"][answered]), abs=1e-4)
        assert asked["conformal"]["coverage"] == pytest.approx(covered[rows].mean(), abs=1e-4)
        assert asked["conformal"]["mean_set_size"] == pytest.approx(sets[rows].map(len).mean(), abs=1e-4)


def test_bad_trust_requests_get_one_line_and_write_nothing(trained_runs, new_cells, tmp_path, capsys):
    bare = shutil.copytree(trained_runs[0], tmp_path / "bare", ignore=shutil.ignore_patterns("wandb", "csv"))
    (bare / "calibration.json").unlink()
    cases = [(str(trained_runs[0]), ["--abstain", "0"], "--abstain 0.0: the share of cells to answer"),
             (str(trained_runs[0]), ["--abstain", "1.5"], "give a number in (0, 1]"),
             (str(trained_runs[0]), ["--conformal", "0"], "--conformal: 0.0 is no miscoverage rate"),
             (str(trained_runs[0]), ["--conformal", "1"], "between 0 and 1 (exclusive)"),
             (str(trained_runs[0]), ["--uncertainty", "margin"], "choose one of max_softmax, entropy, energy, knn"),
             (str(bare), ["--conformal", "0.1"], "no calibration.json (a run trained before calibration")]
    for number, (model, options, expected) in enumerate(cases):
        out = tmp_path / f"{number}.h5ad"
        capsys.readouterr()
        with pytest.raises(SystemExit) as ended:
            cli.main(["predict", model, str(new_cells), "--out", str(out), "--layer", "counts", *options])
        lines = capsys.readouterr().err.strip().splitlines()
        assert ended.value.code == 2 and len(lines) == 1 and expected in lines[0], (number, lines)
        assert not out.exists() and not list(tmp_path.glob(f"{number}*"))


def test_abstaining_when_a_class_is_named_unknown_is_refused():
    """The abstained cells' label would be read as that class's calls."""
    with pytest.raises(InputError, match=r"^run: --abstain labels the cells it does not call 'unknown', which is"):
        TrustAsked(abstain=0.8).check([], "run", ["B cells", "unknown"])


def test_a_cv_ensemble_abstains_where_most_folds_do_and_its_sets_are_the_union_of_theirs(two_fold_cv_run, cohort,
                                                                                         tmp_path):
    """Each fold judged against its own validation donor: with two folds a cell is unknown where both folds, each
    alone (--fold), abstain, and its set holds every class either fold's set holds. On cells of neither fold's
    validation donor (a validation cell sits on its fold's threshold, where float noise could tip it)."""
    validation = {donor for fold in ("KUL01", "KUL19") for donor in read_run(two_fold_cv_run / "folds" / fold).donors(
        "val")}
    cells = ad.read_h5ad(cohort(two_fold_cv_run))
    cells[~cells.obs["donor"].isin(validation)].copy().write_h5ad(tmp_path / "cells.h5ad")
    asked = ["--ensembl-key", "ensembl_id", "--abstain", "0.5", "--conformal", "0.2"]

    def predicted(name: str, *fold: str) -> ad.AnnData:
        cli.main(["predict", str(two_fold_cv_run), str(tmp_path / "cells.h5ad"), "--out",
                  str(tmp_path / f"{name}.h5ad"), *asked, *fold])
        return ad.read_h5ad(tmp_path / f"{name}.h5ad")

    ensemble, *folds = (predicted(name, *fold) for name, fold in (("ensemble", ()), ("KUL01", ("--fold", "KUL01")),
                                                                  ("KUL19", ("--fold", "KUL19"))))
    unknown = [predicted.obs["gfc_label"].eq("unknown").to_numpy() for predicted in (ensemble, *folds)]
    assert unknown[1].any() and unknown[2].any() and not (unknown[1] & unknown[2]).all()
    np.testing.assert_array_equal(unknown[0], unknown[1] & unknown[2])
    sets = [predicted.obs["gfc_conformal_set"].astype(str).map(lambda chosen: set(chosen.split("|")) - {""})
            for predicted in (ensemble, *folds)]
    assert [len(chosen) for chosen in sets[0]] != [len(chosen) for chosen in sets[1]]
    assert all(mine == first | second for mine, first, second in zip(*sets))
    uns = ensemble.uns["gfc"]
    assert len(uns["abstain"]["threshold"]) == 2 and "most folds" in uns["abstain"]["rule"]
    assert "union of the folds' sets" in uns["conformal"]["note"]
