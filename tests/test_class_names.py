"""A real dataset's class names (`CD14+ Monocyte`, `CD4+/CD25 T Reg`, `B cells`: spaces, '+' and '/') through every
command, from a cohort whose classes the config does not list (data.labels=null): each output file reads back,
and no anndata warning is printed."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import pandas as pd
import pytest
from helpers.tiny import TINY_ENCODER, compose_train

from geneformer_colon.cli import verbs as cli
from geneformer_colon.jobs import donor_cv
from geneformer_colon.jobs.train import train
from geneformer_colon.runs.reading import read_run

NAMES = {"Normal": "CD14+ Monocyte", "Border": "CD4+/CD25 T Reg", "Tumor": "B cells"}


@pytest.fixture(scope="module")
def named_cohort(trained_runs, cohort, tmp_path_factory):
    """The tiny cohort with the classes renamed, its label column named ``cell_class``."""
    cells = ad.read_h5ad(cohort(trained_runs[0]))
    cells.obs["cell_class"] = cells.obs.pop("label").map(NAMES).astype("category")
    path = tmp_path_factory.mktemp("named") / "cells.h5ad"
    cells.write_h5ad(path)
    return path


def compose(path, out, *overrides):
    return compose_train([f"paths.output_dir={out}", f"paths.cache_dir={out / 'cache'}", "data=h5ad",
                          f"data.source.path={path}", "data.source.label_key=cell_class", "data.labels=null",
                          "data.batch_size=32", "model.tokenizer.input_size=128", "callbacks.progress_bar=null",
                          *TINY_ENCODER, "trainer.max_epochs=1", "logger=csv", f"paths.run_dir={out / 'run'}",
                          *overrides])


@pytest.mark.slow  # processes (or every command in turn): make test-slow, in CI
def test_class_names_with_spaces_plus_and_slash_go_through_every_command(named_cohort, tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(compose(named_cohort, tmp_path))
        run_dir = tmp_path / "run"
        assert read_run(run_dir).class_names == sorted(NAMES.values())  # data.labels=null: the training donors'
        donor_cv.run(train, compose(named_cohort, tmp_path, "cv=lodo", "cv.folds=[KUL01]",
                                    f"paths.run_dir={tmp_path / 'cv'}"))
        cv_md = (tmp_path / "cv" / "cv.md").read_text()
        assert all(name in cv_md for name in NAMES.values())

        cli.main(["compare", str(run_dir), str(tmp_path / "cv"), "--out", str(tmp_path / "compare")])
        assert (tmp_path / "compare" / "recall_per_class.png").is_file()

        predicted = tmp_path / "predicted.h5ad"
        cli.main(["predict", str(run_dir), str(named_cohort), "--ensembl-key", "ensembl_id", "--label-key",
                  "cell_class", "--donor-key", "donor", "--out", str(predicted), "--abstain", "0.8", "--conformal",
                  "0.1", "--uncertainty", "knn"])
        obs = ad.read_h5ad(predicted).obs
        assert set(obs["gfc_label"]) <= {*NAMES.values(), "unknown"} and obs["gfc_label"].eq("unknown").any()
        sets = obs["gfc_conformal_set"].astype(str).map(lambda chosen: set(chosen.split("|")) - {""})
        assert set().union(*sets) <= set(NAMES.values()) and sets.map(len).max() > 1
        metrics = json.loads((tmp_path / "predicted_metrics" / "metrics.json").read_text())
        assert {f"recall/{name}" for name in NAMES.values()} <= set(metrics["test"])
        assert metrics["test"]["asked"]["conformal"]["alpha"] == 0.1

        cli.main(["embed", str(run_dir), str(named_cohort), "--ensembl-key", "ensembl_id", "--label-key",
                  "cell_class", "--out", str(tmp_path / "embed")])
        silhouette = json.loads((tmp_path / "embed" / "silhouette.json").read_text())["silhouette"]
        assert silhouette["label"] is not None and silhouette["donor"] is not None
        assert set(ad.read_h5ad(tmp_path / "embed" / "embedding.h5ad").obs["label"]) == set(NAMES.values())

        cli.main(["export", str(run_dir), str(tmp_path / "export")])
        for goal in NAMES.values():
            out = tmp_path / "perturb" / goal.replace("/", "-")
            cli.main(["perturb", str(tmp_path / "export"), str(named_cohort), "--ensembl-key", "ensembl_id",
                      "--label-key", "cell_class", "--goal", goal, "--where", "donor=KUL01", "--max-cells", "6",
                      "--min-cells", "3", "--out", str(out)])
            table = pd.read_csv(out / "genes.csv")
            shifts = ad.read_h5ad(out / "shifts.h5ad")
            assert f"mean_delta_{goal}" in table.columns and f"mean delta_{goal}" in (out / "genes.md").read_text()
            decoded = {key.replace("%2F", "/").replace("%25", "%") for key in shifts.layers}
            assert {f"delta_{other}" for other in NAMES.values() if other != goal} <= decoded
        explained = tmp_path / "explain"
        cli.main(["explain", str(run_dir), "--target", "CD4+/CD25 T Reg", "--max-cells", "4", "--steps", "2",
                  "--min-cells", "2", "--out", str(explained)])
        assert ad.read_h5ad(explained / "attributions.h5ad").obs["explained"].eq("CD4+/CD25 T Reg").all()
    from_anndata = [str(w.message) for w in caught if "anndata" in (w.filename or "") or "h5" in str(w.message)]
    assert not from_anndata
    capsys.readouterr()
