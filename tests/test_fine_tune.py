"""End-to-end training runs on tiny synthetic data: experiments, init_from, outputs, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, compose_train, tiny_overrides
from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

from geneformer_colon.builders import build_datamodule, build_module, load_weights, start_from
from geneformer_colon.errors import InputError
from geneformer_colon.fine_tune import train
from geneformer_colon.model.module import CellClassifier

CLASSES = ["Normal", "Border", "Tumor"]


def run(tmp_path: Path, shared: dict, *overrides: str) -> dict:
    return train(compose_train(tiny_overrides(tmp_path / "outputs", shared) + list(overrides)))


def metrics_of(tmp_path: Path, run_name: str) -> dict:
    return json.loads((tmp_path / "outputs" / run_name / "metrics.json").read_text())


@pytest.mark.parametrize("experiment", ["colon1", "colon3", "colon6"])
def test_experiment_composes_and_runs_fast_dev_run(tmp_path, shared_dirs, experiment):
    run(tmp_path, shared_dirs, f"experiment={experiment}", "trainer.fast_dev_run=true")
    assert metrics_of(tmp_path, experiment)["status"] == "finished"


def test_experiments_from_colon3_start_from_its_best_weights(tmp_path, shared_dirs):
    run(tmp_path, shared_dirs, "experiment=colon3")
    best = torch.load(tmp_path / "outputs/colon3/checkpoints/best.ckpt", weights_only=True)["state_dict"]
    for experiment in ("colon4", "colon5"):
        cfg = compose_train(tiny_overrides(tmp_path / "outputs", shared_dirs) + [f"experiment={experiment}"])
        assert cfg.init_from == str(tmp_path / "outputs" / "colon3")
        module = build_module(cfg, build_datamodule(cfg))
        load_weights(module, cfg.init_from)
        for name, tensor in module.state_dict().items():
            torch.testing.assert_close(tensor, best[name], msg=name)
        run(tmp_path, shared_dirs, f"experiment={experiment}", "trainer.fast_dev_run=true")
        assert metrics_of(tmp_path, experiment)["init_from"] == str(tmp_path / "outputs" / "colon3")

    # model.reinit_head: the encoder from colon3, the head fresh
    module = build_module(cfg, build_datamodule(cfg))
    start_from(module, cfg.init_from, reinit_head=True)
    for name, tensor in module.state_dict().items():
        same = torch.equal(tensor, best[name])
        assert same != name.startswith("head."), name


def test_checkpoint_of_another_vocabulary_is_refused(tmp_path, shared_dirs):
    run(tmp_path, shared_dirs, "run_name=small_vocab", "data.source.n_genes=200", "trainer.limit_train_batches=2")
    cfg = compose_train(tiny_overrides(tmp_path / "outputs", shared_dirs))
    module = build_module(cfg, build_datamodule(cfg))
    with pytest.raises(InputError, match="vocabulary"):
        load_weights(module, tmp_path / "outputs" / "small_vocab")


def test_embedded_default_writes_the_whole_run_directory(tmp_path, shared_dirs):
    overrides = tiny_overrides(tmp_path / "outputs", shared_dirs)
    # a cohort just large enough to learn the classes in seconds (and show KUL19's shift)
    overrides = [o for o in overrides if not o.startswith(
        ("trainer.max_epochs", "callbacks.progress_bar", "data.source.n_", "model.tokenizer.input_size"))]
    result = subprocess.run(
        [sys.executable, "train.py", "experiment=colon6", *overrides, "trainer.max_epochs=6",
         "data.source.n_cells=1200", "data.source.n_genes=500", "model.tokenizer.input_size=256",
         "optimizer.lr=3e-3"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "colon6"
    for name in ("config.yaml", "metrics.json", "history.md", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                 "predictions/val.csv", "predictions/test.csv", "plots/confusion_val.png",
                 "plots/confusion_test.png", "csv/version_0/metrics.csv", "dictionaries/token_dictionary.pkl",
                 "wandb/run_id"):
        assert (run_dir / name).is_file(), name
    assert "best epoch" in result.stdout and str(run_dir) in result.stdout
    assert "PASS" in result.stdout or "FAIL" in result.stdout
    # a quiet console: no library tips, deprecations or warnings
    for noise in ("Tip:", "deprecated", "UserWarning", "FutureWarning", "wandb: WARNING", "storing", "GPU available"):
        assert noise not in result.stdout + result.stderr, noise

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [epoch["epoch"] for epoch in metrics["epochs"]][:3] == [0, 1, 2]
    assert metrics["best_epoch"] in range(len(metrics["epochs"]))
    assert set(metrics["success"]) == {"val/macro_f1", "test/macro_f1"}
    assert metrics["donors"] == {"train": ["KUL21", "KUL28", "KUL30", "KUL31"], "val": ["KUL19"], "test": ["KUL01"]}
    assert "experiment=colon6" in metrics["recipe"]["overrides"]
    assert "lr-AdamW/weights" in pd.read_csv(run_dir / "csv/version_0/metrics.csv").columns  # the learning rate
    for split in ("val", "test"):
        table = pd.read_csv(run_dir / "predictions" / f"{split}.csv")
        probabilities = table[[f"prob_{c}" for c in CLASSES]].to_numpy()
        truth = table["true"].map(CLASSES.index).to_numpy()
        assert set(table["donor"]) == ({"KUL19"} if split == "val" else {"KUL01"})
        assert metrics[split]["cells"] == len(table)
        # metrics.json agrees with scikit-learn on the written predictions (to its 4 decimals)
        assert metrics[split]["accuracy"] == pytest.approx(accuracy_score(truth, probabilities.argmax(1)), abs=1e-4)
        assert metrics[split]["macro_f1"] == pytest.approx(
            f1_score(truth, probabilities.argmax(1), average="macro"), abs=1e-4)
        assert metrics[split]["macro_auroc"] == pytest.approx(
            roc_auc_score(truth, probabilities, multi_class="ovr", average="macro"), abs=1e-4)
        # each cell type's figures equal scikit-learn's on its rows
        for cell_type, values in metrics[split]["by_cell_type"].items():
            rows = table[table["cell_type"] == cell_type]
            assert values["cells"] == len(rows)
            assert values["macro_f1"] == pytest.approx(f1_score(rows["true"], rows["predicted"], average="macro"),
                                                       abs=1e-4)
            recalls = recall_score(rows["true"], rows["predicted"], labels=CLASSES, average=None, zero_division=0)
            for name, recall in zip(CLASSES, recalls):
                if (rows["true"] == name).any():
                    assert values[f"recall/{name}"] == pytest.approx(recall, abs=1e-4)
    # better than always predicting the most common class of the test donor
    truth = pd.read_csv(run_dir / "predictions/test.csv")["true"]
    constant = f1_score(truth, [truth.mode()[0]] * len(truth), average="macro")
    assert metrics["test"]["macro_f1"] > constant + 0.05
    # the donor shift of the log: the validation donor KUL19 is clearly harder than the test donor KUL01
    assert metrics["test"]["macro_f1"] >= metrics["val"]["macro_f1"] + 0.15

    # Lightning's own API rebuilds the classifier from the checkpoint alone
    module = CellClassifier.load_from_checkpoint(run_dir / "checkpoints/best.ckpt")
    assert module.class_names == CLASSES and module.hparams.pooling == "mean"


def test_a_finished_run_is_not_overwritten_by_accident(tmp_path, shared_dirs):
    run(tmp_path, shared_dirs, "run_name=once", "trainer.fast_dev_run=true")
    with pytest.raises(InputError, match="overwrite=true"):
        run(tmp_path, shared_dirs, "run_name=once", "trainer.fast_dev_run=true")
    run(tmp_path, shared_dirs, "run_name=once", "trainer.fast_dev_run=true", "overwrite=true")


def test_success_criteria_are_checked_and_recorded(tmp_path, shared_dirs):
    run(tmp_path, shared_dirs, "run_name=criteria", "trainer.fast_dev_run=true",
        "+success_criteria={val/accuracy: 0.0, test/macro_f1: 1.01}")
    success = metrics_of(tmp_path, "criteria")["success"]
    assert success["val/accuracy"]["passed"] is True
    assert success["test/macro_f1"]["passed"] is False


def test_a_save_pretrained_checkpoint_with_its_dictionaries_fine_tunes_through_model_pretrained(tmp_path, shared_dirs):
    from transformers import BertConfig, BertForMaskedLM

    tiny = tiny_overrides(tmp_path / "outputs", shared_dirs)
    datamodule = build_datamodule(compose_train(tiny))
    checkpoint = BertForMaskedLM(BertConfig(
        vocab_size=len(datamodule.dictionaries.token), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=256, hidden_act="relu", pad_token_id=0))
    checkpoint.save_pretrained(tmp_path / "geneformer")
    datamodule.dictionaries.save(tmp_path / "geneformer")

    shape = [o for o in tiny if not o.startswith("model.encoder.")]  # the checkpoint has its own shape
    cfg = compose_train(shape + ["model=pretrained", f"model.encoder.pretrained={tmp_path / 'geneformer'}",
                                "model.tokenizer.input_size=128", "run_name=pretrained", "trainer.fast_dev_run=true"])
    encoder = build_module(cfg, build_datamodule(cfg)).encoder.bert.state_dict()
    for name, tensor in checkpoint.bert.state_dict().items():
        if not name.startswith("pooler"):
            torch.testing.assert_close(encoder[name], tensor, msg=name)
    train(cfg)
    assert metrics_of(tmp_path, "pretrained")["status"] == "finished"
