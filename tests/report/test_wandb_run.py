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
from geneformer_colon.report.wandb_run import keep_files
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
    assert {"colon6", "synthetic", "tiny", "mine"} <= set(run.tags)
    # the job refused for a bad value: a failed run with its config and the error line
    assert refused.exit_code == 1
    assert refused.summary["error"].startswith("augment.mixup_prob is 2; set it to")
    assert refused.config["augment.mixup_prob"] == 2 and refused.history == []
    # the config, flat and resolved: the recipe, not where things are (those are the notes)
    assert run.config["augment.mixup_prob"] == 0.15
    assert run.config["loss.focal_gamma"] == 1.5 and run.config["loss.class_weights.Tumor"] == 2.2
    assert run.config["data.balance_strategy"] == "class_donor"
    assert not [key for key in run.config if key.endswith(("_target_", "dir", "dirpath"))
                or key.startswith(("paths.", "logger.")) or key in ("resume", "overwrite")]
    assert f"paths.run_dir: {sweep_dir / '0'}" in run.notes.splitlines()
    assert f"callbacks.model_checkpoint.dirpath: {sweep_dir / '0' / 'checkpoints'}" in run.notes.splitlines()
    assert (run.directory / "files" / "config.yaml").read_text() == (sweep_dir / "0" / "config.yaml").read_text()
    # curves by epoch, their summary the best so far, declared up front
    assert run.metrics["val/macro_f1"].step_metric == "epoch" and run.metrics["val/macro_f1"].summary.max
    assert run.metrics["val/recall/Tumor"].step_metric == "epoch" and run.metrics["val/recall/Tumor"].summary.max
    assert run.metrics["val/loss"].step_metric == "epoch" and run.metrics["val/loss"].summary.min
    assert "lr-AdamW/weights" in {key for row in run.history for key in row}  # the learning rate, per step
    # validation points are metrics.json's epochs one for one; nothing after the last epoch, no test point
    val_rows = run.rows("val/macro_f1")
    assert [row["epoch"] for row in val_rows] == [epoch["epoch"] for epoch in metrics["epochs"]] == [0, 1]
    for row, epoch in zip(val_rows, metrics["epochs"]):
        assert row["val/macro_f1"] == pytest.approx(epoch["val/macro_f1"], abs=1e-4)
        assert row["val/recall/Tumor"] == pytest.approx(epoch["val/recall/Tumor"], abs=1e-4)
    assert run.history[-1]["epoch"] == 1
    assert not [key for row in run.history for key in row if key.startswith(("test/", "per_class", "confusion"))]
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
        assert (run.directory / "files" / run.summary[f"confusion_plot/{split}"]["path"]).is_file()


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
    assert [row[0] for row in media_table(sweep_run, "jobs_table")["data"]] == [0, 1]
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
    assert run.summary["error"].startswith("FloatingPointError: train/loss is nan at epoch 0, step ")
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
    epochs = [row["epoch"] for part in (paused, resumed) for row in part.rows("val/macro_f1")]
    assert epochs == [epoch["epoch"] for epoch in metrics_of(run_dir)["epochs"]] == [0, 1]
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
