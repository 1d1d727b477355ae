"""End-to-end training runs on tiny synthetic data: experiments, resume, init_from, outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from conftest import REPO_ROOT, compose_train, tiny_overrides
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from geneformer_colon.builders import (
    build_datamodule,
    build_module,
    load_weights,
    start_from,
)
from geneformer_colon.errors import InputError
from geneformer_colon.training import run_training

CLASSES = ["Normal", "Border", "Tumor"]


def train(tmp_path: Path, shared: dict, *overrides: str) -> float:
    return run_training(compose_train(tiny_overrides(tmp_path / "outputs", shared) + list(overrides)))


def metrics_of(tmp_path: Path, run_name: str) -> dict:
    return json.loads((tmp_path / "outputs" / run_name / "metrics.json").read_text())


@pytest.mark.parametrize("experiment", ["colon1", "colon3", "colon6"])
def test_experiment_composes_and_runs_fast_dev_run(tmp_path, shared_dirs, experiment):
    train(tmp_path, shared_dirs, f"experiment={experiment}", "+trainer.fast_dev_run=true")
    assert metrics_of(tmp_path, experiment)["status"] == "finished"


def test_experiments_from_colon3_start_from_its_best_weights(tmp_path, shared_dirs):
    train(tmp_path, shared_dirs, "experiment=colon3")
    best = torch.load(tmp_path / "outputs/colon3/checkpoints/best.ckpt", weights_only=True)["state_dict"]
    for experiment in ("colon4", "colon5"):
        cfg = compose_train(tiny_overrides(tmp_path / "outputs", shared_dirs) + [f"experiment={experiment}"])
        assert cfg.init_from == str(tmp_path / "outputs" / "colon3")
        module = build_module(cfg, build_datamodule(cfg))
        load_weights(module, cfg.init_from)
        for name, tensor in module.state_dict().items():
            torch.testing.assert_close(tensor, best[name], msg=name)
        train(tmp_path, shared_dirs, f"experiment={experiment}", "+trainer.fast_dev_run=true")
        assert metrics_of(tmp_path, experiment)["init_from"] == str(tmp_path / "outputs" / "colon3")

    # model.reinit_head: the encoder from colon3, the head fresh
    module = build_module(cfg, build_datamodule(cfg))
    start_from(module, cfg.init_from, reinit_head=True)
    for name, tensor in module.state_dict().items():
        same = torch.equal(tensor, best[name])
        assert same != name.startswith("head."), name


def test_checkpoint_of_another_vocabulary_is_refused(tmp_path, shared_dirs):
    train(tmp_path, shared_dirs, "run_name=small_vocab", "data.source.n_genes=200")
    cfg = compose_train(tiny_overrides(tmp_path / "outputs", shared_dirs))
    module = build_module(cfg, build_datamodule(cfg))
    with pytest.raises(InputError, match="vocabulary"):
        load_weights(module, tmp_path / "outputs" / "small_vocab")


class Interrupt(pl.Callback):
    """Ctrl-C in epoch 1 after ``after_batches`` training steps (0: as the epoch starts)."""

    def __init__(self, after_batches: int) -> None:
        self.after_batches = after_batches

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1 and self.after_batches == 0:
            raise KeyboardInterrupt

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx + 1 == self.after_batches:
            raise KeyboardInterrupt


def pause_and_resume(tmp_path, shared, monkeypatch, run_name: str, after_batches: int, *common: str) -> None:
    import geneformer_colon.training as training

    real_build_trainer = training.build_trainer
    monkeypatch.setattr(training, "build_trainer",
                        lambda cfg, callbacks: real_build_trainer(cfg, callbacks + [Interrupt(after_batches)]))
    with pytest.raises(SystemExit):
        train(tmp_path, shared, f"run_name={run_name}", *common)
    monkeypatch.setattr(training, "build_trainer", real_build_trainer)
    assert (tmp_path / "outputs" / run_name / "checkpoints/last.ckpt").is_file()
    with pytest.raises(InputError, match="resume=true"):
        train(tmp_path, shared, f"run_name={run_name}", *common)
    train(tmp_path, shared, f"run_name={run_name}", "resume=true", *common)


RESUME_SETTINGS = ["trainer.max_epochs=2", "callbacks.early_stopping=null", "augment.token_mask_prob=0.05",
                   "augment.mixup_prob=0.5", "data.balance_strategy=class_donor"]


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path, shared_dirs, monkeypatch):
    train(tmp_path, shared_dirs, "run_name=straight", *RESUME_SETTINGS)
    pause_and_resume(tmp_path, shared_dirs, monkeypatch, "paused", 0, *RESUME_SETTINGS)
    straight, resumed = metrics_of(tmp_path, "straight"), metrics_of(tmp_path, "paused")
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1]
    for split in ("val", "test"):
        for key in ("accuracy", "macro_f1", "macro_auroc", "loss"):
            assert resumed[split][key] == pytest.approx(straight[split][key], abs=1e-6), (split, key)
    for resumed_epoch, straight_epoch in zip(resumed["epochs"], straight["epochs"]):
        assert resumed_epoch == pytest.approx(straight_epoch, abs=1e-6)


def test_interrupted_mid_epoch_resumes_within_that_epoch(tmp_path, shared_dirs, monkeypatch):
    pause_and_resume(tmp_path, shared_dirs, monkeypatch, "mid_epoch", 3, *RESUME_SETTINGS)
    resumed = metrics_of(tmp_path, "mid_epoch")
    assert resumed["status"] == "finished"
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1]


def test_embedded_default_writes_the_whole_run_directory(tmp_path, shared_dirs):
    overrides = tiny_overrides(tmp_path / "outputs", shared_dirs)
    overrides = [o for o in overrides if not o.startswith(("trainer.max_epochs", "callbacks.progress_bar"))]
    result = subprocess.run(
        [sys.executable, "train.py", "experiment=colon6", *overrides, "trainer.max_epochs=6",
         "data.source.n_cells=1200", "model.learning_rate=3e-3"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "colon6"
    for name in ("config.yaml", "metrics.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                 "predictions/val.csv", "predictions/test.csv", "plots/confusion_val.png",
                 "plots/confusion_test.png", "csv/version_0/metrics.csv", "dictionaries/token_dictionary.pkl"):
        assert (run_dir / name).is_file(), name
    assert "best epoch" in result.stdout and str(run_dir) in result.stdout
    assert "PASS" in result.stdout or "FAIL" in result.stdout

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [epoch["epoch"] for epoch in metrics["epochs"]][:3] == [0, 1, 2]
    assert metrics["best_epoch"] in range(len(metrics["epochs"]))
    assert set(metrics["success"]) == {"val/macro_f1", "test/macro_f1"}
    for split in ("val", "test"):
        table = pd.read_csv(run_dir / "predictions" / f"{split}.csv")
        probabilities = table[[f"prob_{c}" for c in CLASSES]].to_numpy()
        truth = table["true"].map(CLASSES.index).to_numpy()
        assert set(table["donor"]) == ({"KUL19"} if split == "val" else {"KUL01"})
        # metrics.json agrees with scikit-learn on the written predictions
        assert metrics[split]["accuracy"] == pytest.approx(accuracy_score(truth, probabilities.argmax(1)), abs=1e-6)
        assert metrics[split]["macro_f1"] == pytest.approx(
            f1_score(truth, probabilities.argmax(1), average="macro"), abs=1e-6)
        assert metrics[split]["macro_auroc"] == pytest.approx(
            roc_auc_score(truth, probabilities, multi_class="ovr", average="macro"), abs=1e-4)
    # better than always predicting the most common class of the test donor
    truth = pd.read_csv(run_dir / "predictions/test.csv")["true"]
    constant = f1_score(truth, [truth.mode()[0]] * len(truth), average="macro")
    assert metrics["test"]["macro_f1"] > constant + 0.05


def test_a_finished_run_is_not_overwritten_by_accident(tmp_path, shared_dirs):
    train(tmp_path, shared_dirs, "run_name=once", "+trainer.fast_dev_run=true")
    with pytest.raises(InputError, match="overwrite=true"):
        train(tmp_path, shared_dirs, "run_name=once", "+trainer.fast_dev_run=true")
    train(tmp_path, shared_dirs, "run_name=once", "+trainer.fast_dev_run=true", "overwrite=true")


def test_success_criteria_are_checked_and_recorded(tmp_path, shared_dirs):
    train(tmp_path, shared_dirs, "run_name=criteria", "+trainer.fast_dev_run=true",
          "+success_criteria={val/accuracy: 0.0, test/macro_f1: 1.01}")
    success = metrics_of(tmp_path, "criteria")["success"]
    assert success["val/accuracy"]["passed"] is True
    assert success["test/macro_f1"]["passed"] is False


def test_a_save_pretrained_checkpoint_loads_through_model_pretrained(tmp_path, shared_dirs):
    from transformers import BertConfig, BertForMaskedLM

    tiny = tiny_overrides(tmp_path / "outputs", shared_dirs)
    vocab_size = len(build_datamodule(compose_train(tiny)).dictionaries.token)
    checkpoint = BertForMaskedLM(BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=256, hidden_act="relu", pad_token_id=0))
    checkpoint.save_pretrained(tmp_path / "geneformer")

    cfg = compose_train(tiny + [f"model.pretrained={tmp_path / 'geneformer'}", "run_name=pretrained",
                                "+trainer.fast_dev_run=true"])
    encoder = build_module(cfg, build_datamodule(cfg)).encoder.bert.state_dict()
    for name, tensor in checkpoint.bert.state_dict().items():
        if not name.startswith("pooler"):
            torch.testing.assert_close(encoder[name], tensor, msg=name)
    run_training(cfg)
    assert metrics_of(tmp_path, "pretrained")["status"] == "finished"


def test_eval_scores_the_best_checkpoint_on_other_donors(tmp_path, shared_dirs):
    train(tmp_path, shared_dirs, "run_name=to_eval")
    run_dir = tmp_path / "outputs" / "to_eval"
    result = subprocess.run(
        [sys.executable, "eval.py", f"run_dir={run_dir}", "data.test_donors=[KUL21]"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = run_dir / "eval" / "test-KUL21"
    metrics = json.loads((out / "metrics.json").read_text())
    table = pd.read_csv(out / "predictions" / "test.csv")
    assert set(table["donor"]) == {"KUL21"}
    assert (out / "plots" / "confusion_test.png").is_file()
    truth = table["true"].map(CLASSES.index)
    assert metrics["test"]["accuracy"] == pytest.approx(
        accuracy_score(truth, table[[f"prob_{c}" for c in CLASSES]].to_numpy().argmax(1)), abs=1e-6)

    bad = subprocess.run([sys.executable, "eval.py", f"run_dir={run_dir}", "data.test_donors=[KUL77]"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "KUL77" in bad.stderr and "Traceback" not in bad.stderr
