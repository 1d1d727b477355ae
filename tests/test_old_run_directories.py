"""A run directory and an export written before the package was laid out by layer (tests/fixtures/before_layers,
made with the code of commit 65b820b; its README says how) still evaluate, predict, export and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from geneformer_colon.cli import verbs
from geneformer_colon.jobs.evaluate import run_evaluation
from geneformer_colon.jobs.train import train
from geneformer_colon.runs.config import CONF_DIR
from geneformer_colon.runs.reading import current_record, read_config

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "before_layers"
# The command line the fixture's run was made with (its README), less the paths.
RECIPE = ["experiment=colon6", "logger=csv", "trainer.max_epochs=2", "run_name=old-run", "callbacks.progress_bar=null",
          "data.source.n_cells=480", "data.source.n_genes=300", "data.batch_size=32", "model.tokenizer.input_size=128",
          "model.encoder.hidden_size=32", "model.encoder.intermediate_size=64", "model.encoder.num_attention_heads=2",
          "model.encoder.num_hidden_layers=2"]


@pytest.fixture
def old_run(tmp_path) -> Path:
    """A copy of the fixture's paused run directory under ``tmp_path/outputs``."""
    run_dir = tmp_path / "outputs" / "old-run"
    shutil.copytree(FIXTURE / "run", run_dir)
    return run_dir


def location(tmp_path: Path, shared_dirs: dict[str, Path]) -> list[str]:
    return [f"paths.output_dir={tmp_path / 'outputs'}", f"paths.data_dir={shared_dirs['data']}",
            f"paths.cache_dir={shared_dirs['cache']}"]


def probabilities(table: pd.DataFrame) -> np.ndarray:
    return table[[column for column in table.columns if column.startswith("prob_")]].to_numpy()


def test_its_config_names_the_old_modules_and_reads_back_with_the_new_ones(old_run):
    assert "geneformer_colon.callbacks.BestCheckpoint" in (old_run / "config.yaml").read_text()
    callbacks = read_config(old_run / "config.yaml")["callbacks"]
    assert callbacks["model_checkpoint"]["_target_"] == "geneformer_colon.model.callbacks.BestCheckpoint"
    assert callbacks["epoch_log"]["_target_"] == "geneformer_colon.model.callbacks.EpochLog"


def test_an_old_run_resumes_to_where_the_run_left_alone_ended(old_run, tmp_path, shared_dirs):
    """Resumed as ``train.py ... resume=true`` resumes it: in a Hydra app, where a key added since the run started
    counts as no change at its default."""
    overrides = [*RECIPE, *location(tmp_path, shared_dirs), "resume=true"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        app = compose("train", overrides=overrides, return_hydra_config=True)
        with open_dict(app):
            app.hydra.runtime.output_dir = str(old_run)
        HydraConfig.instance().set_config(app)
        try:
            record = train(compose("train", overrides=overrides))
        finally:
            HydraConfig.instance().cfg = None
    expected = current_record(json.loads((FIXTURE / "left_alone_metrics.json").read_text()))  # epochs from 0 there
    assert record["status"] == "finished"
    assert record["epochs"] == expected["epochs"]
    assert record["best_epoch"] == expected["best_epoch"]
    for split in ("val", "test"):
        # the figures the run left alone had; calibration, abstention and conformal figures came later
        assert {key: record[split][key] for key in expected[split]} == expected[split], split
        assert {"ece", "nll", "aurc"} <= set(record[split]), split


def test_an_old_run_evaluates_and_predicts_as_it_did(old_run, tmp_path, shared_dirs):
    record = run_evaluation(old_run, location(tmp_path, shared_dirs), CONF_DIR, name="again")
    assert record["status"] == "finished"
    again = pd.read_csv(old_run / "eval" / "again" / "predictions" / "test.csv")
    left_alone = pd.read_csv(FIXTURE / "left_alone_test.csv")  # the same weights (epoch 1 was the best)
    assert list(again["cell_id"]) == list(left_alone["cell_id"])
    np.testing.assert_allclose(probabilities(again), probabilities(left_alone), atol=1e-5)

    demo = tmp_path / "demo"
    verbs.main(["synth", str(demo), "--cells", "240", "--genes", "300", "--h5ad"])
    expected = np.loadtxt(FIXTURE / "predicted_probabilities.csv", delimiter=",")
    exported = tmp_path / "exported"
    verbs.main(["export", str(old_run), str(exported)])
    for model in (old_run, FIXTURE / "export", exported):  # the run, its old export, a new export of it
        out = tmp_path / f"predicted-{model.name}.h5ad"
        verbs.main(["predict", str(model), str(demo / "cells.h5ad"), "--ensembl-key", "ensembl_id", "--out", str(out)])
        np.testing.assert_allclose(ad.read_h5ad(out).obsm["gfc_probabilities"], expected, atol=1e-5,
                                   err_msg=str(model))
