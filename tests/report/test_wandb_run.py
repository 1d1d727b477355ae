"""W&B logging (wandb_run.py) with the real wandb, offline: what each run's offline files hold, read back with
wandb's protobufs (helpers.wandb_offline)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import wandb
from helpers.paths import REPO_ROOT
from helpers.runs import metrics_of
from helpers.tiny import compose_train, tiny_overrides
from helpers.wandb_offline import all_offline_runs, media_table, offline_runs

from geneformer_colon.common.errors import InputError, Interrupted
from geneformer_colon.jobs.evaluate import run_evaluation
from geneformer_colon.jobs.train import train as run_training
from geneformer_colon.report.wandb_run import NOT_RECIPE_GROUPS, config_choices, keep_files
from geneformer_colon.runs.config import CONF_DIR


def train(tmp_path: Path, shared: dict, *overrides: str) -> Path:
    cfg = compose_train(tiny_overrides(tmp_path / "outputs", shared) + list(overrides))
    run_training(cfg)
    return Path(cfg.paths.run_dir)


def sweep(tmp_path: Path, shared: dict, *overrides: str) -> Path:
    """``train.py -m`` in a subprocess (jobs run one after another in one process) with W&B's console output
    as a user has it (not silenced); the sweep's directory."""
    sweep_dir = tmp_path / "multirun" / "2026-11-24" / "10-00-00"
    result = subprocess.run(
        [sys.executable, "train.py", "-m", *tiny_overrides(tmp_path / "outputs", shared), *overrides,
         f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={name: value for name, value in os.environ.items() if name != "WANDB_SILENT"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb:" not in result.stdout + result.stderr  # W&B's console output is kept to errors
    return sweep_dir


@pytest.mark.slow  # a sweep of several jobs: make test-slow, in CI
def test_each_sweep_job_is_a_wandb_run_and_a_refused_job_a_failed_one(tmp_path, shared_dirs):
    sweep_dir = sweep(tmp_path, shared_dirs, "experiment=colon6", "augment.mixup_prob=0.15,2", "loss.focal_gamma=1.5",
                      "trainer.max_epochs=2", "callbacks.early_stopping=null", "logger.wandb.tags=[mine]")
    job_runs = [offline_runs(sweep_dir / str(job)) for job in (0, 1)]
    assert [len(runs) for runs in job_runs] == [1, 1]
    (run,), (refused,) = job_runs
    metrics = metrics_of(sweep_dir / "0")

    # one W&B run per job, finished, named after the run and its swept value, grouped by the sweep
    assert run.id != refused.id
    assert run.id == (sweep_dir / "0" / "wandb" / "run_id").read_text()
    assert run.exit_code == 0 and metrics["status"] == "finished"  # the refused job leaves the other alone
    assert (run.name, refused.name) == ("colon6 #0: mixup_prob=0.15", "colon6 #1: mixup_prob=2")
    assert run.group == refused.group == "colon6/2026-11-24/10-00-00"
    assert run.job_type == refused.job_type == "train"
    # the options chosen (Hydra's record of the job) as config keys and tags; the class behind an option
    assert {"colon6", "mine", "experiment=colon6", "data=synthetic", "model=tiny", "robust=none",
            "optimizer=adamw", "scheduler=linear", "cv=none"} <= set(run.tags)
    assert [run.config[f"choices.{group}"] for group in ("robust", "optimizer", "model", "cv", "sweep")] == [
        "none", "adamw", "tiny", "none", None]
    assert run.config["robust._target_"] == "geneformer_colon.model.robust.PlainTraining"
    # the job refused for a bad value: a failed run with its config and the error line
    assert refused.exit_code == 1
    assert refused.summary["error"].startswith("augment.mixup_prob is 2; set it to")
    assert refused.config["augment.mixup_prob"] == 2 and refused.history == []
    # the config, flat and resolved: the recipe, not where things are (those are the notes)
    assert run.config["augment.mixup_prob"] == 0.15
    assert run.config["loss.focal_gamma"] == 1.5 and run.config["loss.class_weights.Tumor"] == 2.2
    assert run.config["data.balance_strategy"] == "class_donor"
    assert not [key for key in run.config if key.endswith(("_convert_", "dir", "dirpath"))
                or key.startswith(("paths.", "logger.")) or key in ("resume", "overwrite")]
    assert f"paths.run_dir: {sweep_dir / '0'}" in run.notes.splitlines()
    assert f"callbacks.model_checkpoint.dirpath: {sweep_dir / '0' / 'checkpoints'}" in run.notes.splitlines()
    # the run's config.yaml, byte for byte, under a name W&B does not write itself
    files = run.directory / "files"
    assert not (files / "config.yaml").exists()
    assert (files / "run_config.yaml").read_bytes() == (sweep_dir / "0" / "config.yaml").read_bytes()
    # curves by epoch, counted from 1 as metrics.json and the log lines count
    for name in ("val/macro_f1", "val/recall/Tumor", "val/loss", "train/loss_epoch"):
        assert run.metrics[name].step_metric == "epoch", name
    assert "lr-AdamW/weights" in {key for row in run.history for key in row}  # the learning rate, per step
    # validation points are metrics.json's epochs one for one; nothing after the last epoch, no test point
    val_rows = run.rows("val/macro_f1")
    assert [row["epoch"] for row in val_rows] == [epoch["epoch"] for epoch in metrics["epochs"]] == [1, 2]
    for row, epoch in zip(val_rows, metrics["epochs"]):
        assert row["val/macro_f1"] == pytest.approx(epoch["val/macro_f1"], abs=1e-4)
        assert row["val/recall/Tumor"] == pytest.approx(epoch["val/recall/Tumor"], abs=1e-4)
    assert run.history[-1]["epoch"] == 2
    assert not [key for row in run.history for key in row if key.startswith(("test/", "per_class", "confusion"))]
    # every summary figure flat (media aside), one separator in its keys
    assert not [key for key, value in run.summary.items() if isinstance(value, dict) and "_type" not in value]
    assert not [key for key in run.summary if "." in key]
    assert run.summary["train/loss_epoch"] == pytest.approx(run.rows("train/loss_epoch")[-1]["train/loss_epoch"])
    for cell_type, figures in metrics["test"]["by_cell_type"].items():
        assert run.summary[f"test/by_cell_type/{cell_type}/macro_f1"] == pytest.approx(figures["macro_f1"], abs=1e-4)
    # the best checkpoint's metrics and the success criteria as the run's summary
    for split in ("val", "test"):
        for name in ("macro_f1", "accuracy", "macro_auroc", "recall/Border"):
            assert run.summary[f"{split}/{name}"] == pytest.approx(metrics[split][name], abs=1e-4), (split, name)
    assert run.summary["best_epoch"] == metrics["best_epoch"]
    verdicts = {key: "PASS" if verdict["passed"] else "FAIL" for key, verdict in metrics["success"].items()}
    assert {key: run.summary[f"success/{key}"] for key in verdicts} == verdicts
    assert run.summary["success"] == ("PASS" if set(verdicts.values()) == {"PASS"} else "FAIL")
    # the per-class table and the confusion matrices, in the summary
    per_class = media_table(run, "per_class")
    assert per_class["columns"] == ["split", "class", "precision", "recall", "f1", "cells"]
    rows = {(row[0], row[1]): row for row in per_class["data"]}
    assert len(rows) == 6
    assert rows["test", "Tumor"][3] == pytest.approx(metrics["test"]["recall/Tumor"], abs=1e-4)
    assert rows["val", "Normal"][5] == sum(metrics["val"]["confusion_matrix"][0])
    for split in ("val", "test"):
        table = media_table(run, f"confusion/{split}_table")
        counts = {(actual, predicted): n for actual, predicted, n in table["data"]}
        assert counts["Border", "Tumor"] == metrics[split]["confusion_matrix"][1][2]
        assert f"_wandb/visualize/confusion/{split}" in run.config  # the chart's spec
    # the plots as images, the test predictions as a table
    plots = sorted(path.stem for path in (sweep_dir / "0" / "plots").glob("*.png"))
    assert {"loss", "confusion_test", "roc_test", "pr_test"} <= set(plots)
    for name in plots:
        assert run.summary[f"plots/{name}"]["_type"] == "image-file"
        assert (files / run.summary[f"plots/{name}"]["path"]).is_file()
    predictions = pd.read_csv(sweep_dir / "0" / "predictions" / "test.csv", keep_default_na=False)
    table = media_table(run, "predictions/test")
    assert table["columns"] == list(predictions.columns) and len(predictions) <= 1000
    assert pd.DataFrame(table["data"], columns=table["columns"]).equals(predictions)


@pytest.mark.slow  # a sweep of several jobs: make test-slow, in CI
def test_a_cv_grid_is_a_cv_run_a_job_with_its_folds_beneath(tmp_path, shared_dirs):
    sweep_dir = sweep(tmp_path, shared_dirs, "experiment=colon6", "cv=lodo", "cv.folds=[KUL01,KUL19]",
                      "loss.focal_gamma=0,1.5", "trainer.limit_train_batches=3")
    runs = all_offline_runs(sweep_dir)
    group = "colon6/2026-11-24/10-00-00"
    # the sweep's group: one CV run a job, with the swept key and cv.* in its config, and the sweep's own run
    (sweep_run,) = [run for run in runs if run.job_type == "sweep"]
    assert (sweep_run.group, sweep_run.exit_code) == (group, 0)
    assert (sweep_run.directory / "files" / "summary.csv").read_text() == (sweep_dir / "summary.csv").read_text()
    assert sweep_run.config["sweep.overrides"][-2:] == ["loss.focal_gamma=0,1.5", "trainer.limit_train_batches=3"]
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert sweep_run.name == f"{group} sweep"
    assert [sweep_run.summary[key] for key in ("jobs", "jobs/finished", "jobs/failed", "jobs/running")] == [2, 2, 0, 0]
    assert sweep_run.summary["best/val/macro_f1"] == pytest.approx(summary["val_macro_f1"].max(), abs=1e-4)
    jobs = media_table(sweep_run, "jobs_table")
    rows = [dict(zip(jobs["columns"], row)) for row in jobs["data"]]
    assert [row["job"] for row in rows] == [0, 1] and [row["run_dir"] for row in rows] == ["0", "1"]
    assert [row["wandb_run_id"] for row in rows] == [(sweep_dir / str(job) / "wandb" / "run_id").read_text()
                                                     for job in (0, 1)]  # each job's W&B run
    cv_runs = sorted((run for run in runs if run.group == group and run.job_type == "cv"), key=lambda run: run.name)
    assert [(run.job_type, run.name) for run in cv_runs] == [("cv", "colon6 #0: focal_gamma=0"),
                                                            ("cv", "colon6 #1: focal_gamma=1.5")]
    assert [run.config["loss.focal_gamma"] for run in cv_runs] == [0.0, 1.5]
    for job, run in enumerate(cv_runs):
        cv = json.loads((sweep_dir / str(job) / "cv.json").read_text())
        assert run.exit_code == 0 and run.config["cv.strategy"] == "lodo"
        assert run.config["cv.folds"] == ["KUL01", "KUL19"]
        # its summary: the aggregate and each donor's test macro F1, as in cv.json
        for split in ("val", "test"):
            spread = cv["aggregate"][split]["macro_f1"]
            assert run.summary[f"{split}/macro_f1"] == pytest.approx(spread["mean"], abs=1e-4)
            assert run.summary[f"{split}/macro_f1/sd"] == pytest.approx(spread["sd"], abs=1e-4)
            assert run.summary[f"{split}/macro_f1/ci95_low"] == pytest.approx(spread["ci95"][0], abs=1e-4)
            assert run.summary[f"{split}/macro_f1/worst"] == pytest.approx(spread["min"], abs=1e-4)
        rows = {row["test_donor"]: row for row in cv["folds"]}
        assert set(rows) == {"KUL01", "KUL19"}
        for donor, row in rows.items():
            assert run.summary[f"test/macro_f1/{donor}"] == pytest.approx(row["test"]["macro_f1"], abs=1e-4)
        worst = min(rows.values(), key=lambda row: row["test"]["macro_f1"])["test_donor"]
        assert run.summary["test/macro_f1/worst_donor"] == worst
        assert [row[0] for row in media_table(run, "fold_table")["data"]] == ["KUL01", "KUL19"]
        assert (run.directory / "files" / "cv.json").is_file()
        # its folds: job type fold, in a group of their own named after the job, their donors in the config
        folds = sorted((fold for fold in runs if fold.group == f"{group} #{job}"), key=lambda fold: fold.name)
        assert [(fold.job_type, fold.name, fold.exit_code) for fold in folds] == [
            ("fold", "colon6/KUL01", 0), ("fold", "colon6/KUL19", 0)]
        assert [(fold.config["cv.test_donor"], fold.config["cv.val_donor"]) for fold in folds] == [
            (donor, rows[donor]["val_donor"]) for donor in ("KUL01", "KUL19")]
        assert folds[0].summary["test/macro_f1"] == pytest.approx(rows["KUL01"]["test"]["macro_f1"], abs=1e-4)
    assert len(runs) == 7


def test_a_nan_stopped_run_keeps_its_history_and_says_where_it_stopped(tmp_path, shared_dirs):
    with pytest.raises(FloatingPointError):
        train(tmp_path, shared_dirs, "run_name=diverged", "optimizer.lr=1e6", "trainer.log_every_n_steps=1")
    assert wandb.run is None
    (run,) = offline_runs(tmp_path / "outputs" / "diverged")
    assert run.exit_code == 1
    assert run.summary["error"].startswith("FloatingPointError: train/loss is nan at epoch 1, step ")
    assert run.rows("train/loss_step")  # the step it had
    assert run.config["optimizer.lr"] == 1e6


class PauseAfterFirstEpoch(pl.Callback):
    """Ctrl-C in the first epoch's last batch: the run saves at the epoch's end and stops (Interrupted)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == trainer.num_training_batches - 1:
            os.kill(os.getpid(), signal.SIGINT)


def test_a_paused_and_resumed_run_is_one_wandb_run(tmp_path, shared_dirs, monkeypatch):
    from geneformer_colon.jobs import train as fine_tune

    real_build_trainer = fine_tune.build_trainer
    monkeypatch.setattr(fine_tune, "build_trainer",
                        lambda cfg, callbacks: real_build_trainer(cfg, callbacks + [PauseAfterFirstEpoch()]))
    common = ["run_name=paused", "callbacks.early_stopping=null", "trainer.max_epochs=2"]
    with pytest.raises(Interrupted):
        train(tmp_path, shared_dirs, *common)
    assert wandb.run is None
    monkeypatch.setattr(fine_tune, "build_trainer", real_build_trainer)
    run_dir = train(tmp_path, shared_dirs, *common, "resume=true")
    paused, resumed = offline_runs(run_dir)
    assert paused.id == resumed.id == (run_dir / "wandb" / "run_id").read_text()
    assert (paused.name, paused.group) == (resumed.name, resumed.group) == ("paused", "default")
    assert (paused.exit_code, resumed.exit_code) == (0, 0)  # the paused part is no failure; the whole finished
    # each part says it may go on (resume="allow"), under the one id: `wandb sync` of both parts joins them
    assert paused.resume and resumed.resume
    epochs = [row["epoch"] for part in (paused, resumed) for row in part.rows("val/macro_f1")]
    assert epochs == [epoch["epoch"] for epoch in metrics_of(run_dir)["epochs"]] == [1, 2]
    assert "resume" not in paused.config and "resume" not in resumed.config
    assert resumed.summary["best_epoch"] == metrics_of(run_dir)["best_epoch"]

    # eval.py on the run: a W&B run of its own, job type eval, its test figures as summary
    record = run_evaluation(run_dir, ["data.test_donors=[KUL21]"], CONF_DIR, allow_training_donors=True)
    (evaluation,) = offline_runs(run_dir / "eval" / "test-KUL21")
    assert (evaluation.job_type, evaluation.name, evaluation.exit_code) == ("eval", "paused on test-KUL21", 0)
    assert evaluation.summary["test/macro_f1"] == pytest.approx(record["test"]["macro_f1"], abs=1e-4)

    train(tmp_path, shared_dirs, "run_name=paused", "overwrite=true", "trainer.fast_dev_run=true")
    assert offline_runs(run_dir) == []
    assert (run_dir / "wandb" / "run_id").read_text() != paused.id


def test_the_baseline_is_a_wandb_run_beside_the_sweeps(tmp_path, shared_dirs):
    from geneformer_colon.jobs.baseline import run_baseline

    cfg = compose_train(tiny_overrides(tmp_path / "outputs", shared_dirs) + ["experiment=colon6"], "baseline")
    record = run_baseline(cfg)
    (run,) = offline_runs(Path(cfg.paths.run_dir))
    assert (run.job_type, run.name, run.group, run.exit_code) == ("baseline", "colon6-naive_bayes", "colon6", 0)
    assert run.summary["test/macro_f1"] == pytest.approx(record["test"]["macro_f1"], abs=1e-4)
    assert run.config["baseline.alpha"] == 1.0 and run.history == []
    # only the keys and options it used: no network's, though the config it was given (composed) had them
    unused = ("optimizer", "scheduler", "loss", "augment", "robust", "trainer", "callbacks", "model.encoder")
    assert not [key for key in run.config if key.startswith(unused) or key.removeprefix("choices.").startswith(unused)]
    assert run.config["choices.experiment"] == "colon6" and "choices.model" not in run.config
    assert "experiment=colon6" in run.tags and not [tag for tag in run.tags if tag.startswith(("model=", "optimizer="))]
    assert (run.directory / "files" / "run_config.yaml").read_bytes() == (Path(cfg.paths.run_dir) / "config.yaml"
                                                                          ).read_bytes()
    table = media_table(run, "predictions/test")  # the baseline's predictions, as a training run's
    assert len(table["data"]) == len(pd.read_csv(Path(cfg.paths.run_dir) / "predictions" / "test.csv"))


def test_log_model_uploads_the_best_checkpoint_online_only_by_default(tmp_path):
    from hydra.utils import instantiate

    from geneformer_colon.runs.config import check_values

    def logger(*overrides: str):
        cfg = compose_train([f"paths.output_dir={tmp_path}", *overrides])
        check_values(cfg)
        return instantiate(cfg.logger.wandb)

    assert logger()._log_model is False
    assert logger("logger.wandb.log_model=best")._log_model is True
    with pytest.raises(InputError, match="logger.wandb.log_model is 'all'; set it to best or false"):
        logger("logger.wandb.log_model=all")


def test_csv_logger_alone_writes_no_wandb_files(tmp_path, shared_dirs):
    assert list(compose_train(["logger=csv"]).logger) == ["csv"]
    with_wandb = train(tmp_path, shared_dirs, "run_name=with_wandb", "trainer.fast_dev_run=true")
    csv_only = train(tmp_path, shared_dirs, "run_name=csv_only", "logger=csv", "trainer.fast_dev_run=true")
    assert (with_wandb / "wandb" / "run_id").is_file()
    assert not (csv_only / "wandb").exists()


def test_a_disabled_wandb_run_keeps_no_copy_of_a_file(tmp_path, monkeypatch):
    """WANDB_MODE=disabled: W&B's no-op run has a folder in the temporary directory, which nobody syncs."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    run = wandb.init(mode="disabled")
    assert Path(run.dir).is_relative_to(tmp_path / "tmp")
    keep_files(run, [tmp_path / "config.yaml"], tmp_path)
    run.finish()
    assert not list((tmp_path / "tmp").rglob("config.yaml"))


RECIPE_GROUPS = [("train", []), ("train", ["experiment=colon6", "robust=coral", "optimizer=sgd"]),
                 ("train", ["experiment=colon3", "scheduler=cosine", "model=geneformer_v2", "data=kul3"]),
                 ("train", ["experiment=colon6", "cv=lodo", "sweep=optuna", "augment.mixup_prob=0.3"]),
                 ("train", ["model=pretrained", "model.encoder.pretrained=/x", "trainer=ddp",
                            "robust=donor_adversary"]),
                 ("train", ["experiment=colon5", "robust=group_dro", "scheduler=constant", "data=h5ad",
                            "data.source.path=/x.h5ad"]),
                 ("baseline", ["baseline=pca_knn", "experiment=colon3"])]


@pytest.mark.parametrize(("config_name", "overrides"), RECIPE_GROUPS,
                         ids=[" ".join([name, *overrides]) for name, overrides in RECIPE_GROUPS])
def test_a_config_composed_without_hydra_names_the_options_hydra_would(config_name, overrides):
    """A run started through the compose API (no Hydra app: no record of the choices) gets the options its config
    holds, the ones Hydra's record of the job would give."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    hydra_choices = {group: option for group, option in cfg.hydra.runtime.choices.items()
                     if group.split("/")[0] not in NOT_RECIPE_GROUPS}
    with open_dict(cfg):
        del cfg["hydra"]
    assert config_choices(cfg) == hydra_choices


def test_two_runs_differing_in_robust_differ_in_the_config_key_that_names_it(tmp_path, shared_dirs):
    quick = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
             "optimizer=sgd", "optimizer.lr=0.01"]
    coral = train(tmp_path, shared_dirs, "run_name=coral", "robust=coral", "logger.wandb.table_rows=5", *quick)
    adversary = train(tmp_path, shared_dirs, "run_name=adversary", "robust=donor_adversary", *quick)
    (with_coral,), (with_adversary,) = offline_runs(coral), offline_runs(adversary)
    assert {"optimizer=sgd", "robust=coral", "model=tiny", "data=synthetic"} <= set(with_coral.tags)
    assert with_coral.config["choices.optimizer"] == with_adversary.config["choices.optimizer"] == "sgd"
    assert with_coral.config["optimizer._target_"] == "torch.optim.SGD"
    differ = {key for key in with_coral.config.keys() | with_adversary.config.keys()
              if with_coral.config.get(key) != with_adversary.config.get(key) and not key.startswith("_wandb")}
    assert {"choices.robust", "robust._target_"} <= differ
    assert with_coral.config["choices.robust"] == "coral"
    assert with_adversary.config["choices.robust"] == "donor_adversary"
    assert "robust=donor_adversary" in with_adversary.tags and "robust=coral" not in with_adversary.tags
    # logger.wandb.table_rows caps the test predictions' table: its first rows
    predictions = pd.read_csv(coral / "predictions" / "test.csv", keep_default_na=False)
    table = media_table(with_coral, "predictions/test")
    assert len(predictions) > 5
    assert pd.DataFrame(table["data"], columns=table["columns"]).equals(predictions.head(5))


@pytest.mark.slow  # four fold runs: make test-slow, in CI
def test_a_cv_run_names_its_folds_and_seeds_and_pools_their_confusion_matrices(tmp_path, shared_dirs):
    from geneformer_colon.jobs import donor_cv

    cfg = compose_train(tiny_overrides(tmp_path / "outputs", shared_dirs) + [
        "experiment=colon6", "run_name=cv", "cv=lodo", "cv.folds=[KUL01,KUL19]", "cv.seeds=[0,1]",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"])
    donor_cv.run(run_training, cfg)
    run_dir = Path(cfg.paths.run_dir)
    cv = json.loads((run_dir / "cv.json").read_text())
    (cv_run,) = [run for run in all_offline_runs(run_dir) if run.job_type == "cv"]
    # its config: what it ran, not the composed split and seed
    assert cv_run.config["cv.folds"] == ["KUL01", "KUL19"] and cv_run.config["cv.seeds"] == [0, 1]
    for fold in cv["folds"]:
        assert cv_run.config[f"cv.fold.{fold['test_donor']}.val_donors"] == [fold["val_donor"]]
        assert cv_run.config[f"cv.fold.{fold['test_donor']}.test_donors"] == [fold["test_donor"]]
    assert not {"data.val_donors", "data.test_donors", "seed"} & set(cv_run.config)
    assert cv_run.config["choices.cv"] == "lodo" and "cv=lodo" in cv_run.tags
    # a row a fold and seed
    table = media_table(cv_run, "fold_table")
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(row["test_donor"], row["seed"]) for row in rows] == [("KUL01", 0), ("KUL01", 1), ("KUL19", 0),
                                                                  ("KUL19", 1)]
    for row in rows:
        metrics = metrics_of(run_dir / "folds" / row["run_dir"])
        assert row["best_epoch"] == metrics["best_epoch"]
        assert row["test/macro_f1"] == pytest.approx(metrics["test"]["macro_f1"], abs=1e-4)
    # the pooled confusion matrix: the sum of the folds' (each seed's) matrices; its figures from it
    matrices = [metrics_of(run_dir / "folds" / row["run_dir"])["test"]["confusion_matrix"] for row in rows]
    pooled = np.sum(matrices, axis=0)
    assert cv_run.summary["confusion_matrix/test_pooled"] == pooled.tolist()
    assert cv_run.summary["test/pooled/accuracy"] == pytest.approx(np.trace(pooled) / pooled.sum())
    assert cv_run.summary["test/pooled/recall/Tumor"] == pytest.approx(pooled[2, 2] / pooled[2].sum())
    counts = {(true, predicted): n for true, predicted, n in media_table(cv_run, "confusion/test_pooled_table")["data"]}
    assert counts["Border", "Tumor"] == pooled[1, 2]
    # its plots (per donor) as images, its files under names W&B leaves alone
    plots = sorted(path.stem for path in (run_dir / "plots").glob("*.png"))
    assert plots and all(cv_run.summary[f"plots/{name}"]["_type"] == "image-file" for name in plots)
    files = cv_run.directory / "files"
    assert not (files / "config.yaml").exists() and (files / "cv.json").is_file()
    assert (files / "run_config.yaml").read_bytes() == (run_dir / "config.yaml").read_bytes()
