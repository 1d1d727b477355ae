"""End-to-end training runs on tiny synthetic data: experiments, init_from, outputs, refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, compose_train, run_metrics, tiny_overrides, train_tiny
from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

from geneformer_colon.assembly.builders import build_datamodule, build_module
from geneformer_colon.jobs.train import train
from geneformer_colon.model.module import CellClassifier

CLASSES = ["Normal", "Border", "Tumor"]


@pytest.mark.parametrize("experiment", ["colon1", "colon3", "colon6"])
def test_experiment_composes_and_runs_fast_dev_run(tmp_path, shared_dirs, experiment):
    train_tiny(tmp_path, shared_dirs, f"experiment={experiment}", "trainer.fast_dev_run=true")
    assert run_metrics(tmp_path, experiment)["status"] == "finished"


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
    assert run_metrics(tmp_path, "pretrained")["status"] == "finished"
