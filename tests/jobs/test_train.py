"""A training run end to end (train.py) on tiny synthetic data: the experiments, the whole run directory, a
Hugging Face checkpoint fine-tuned, DDP on two CPU processes, and the real-data path (data=kul3 model=geneformer_v1)
on the real Geneformer dictionaries."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from helpers.paths import REPO_ROOT
from helpers.processes import run_script
from helpers.runs import metrics_of
from helpers.tiny import CLASSES, compose_train, tiny_overrides
from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

from geneformer_colon.assembly.builders import build_datamodule, build_module
from geneformer_colon.common.errors import InputError
from geneformer_colon.data.dictionaries import load_pickle_dict
from geneformer_colon.data.kul3 import write_geo_matrix
from geneformer_colon.data.samplers import EvalBatchSampler
from geneformer_colon.data.synthetic import generate_counts, write_synthetic_kul3
from geneformer_colon.jobs.train import check_recipe, train
from geneformer_colon.model.module import CellClassifier


@pytest.mark.parametrize("experiment", ["colon1", "colon3", "colon6"])
def test_experiment_composes_and_runs_fast_dev_run(tiny_cfg, tmp_path, experiment):
    train(tiny_cfg(f"experiment={experiment}", "trainer.fast_dev_run=true"))
    assert metrics_of(tmp_path / "outputs" / experiment)["status"] == "finished"


@pytest.mark.slow  # processes (six epochs / two at once): make test-slow, in CI
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
    assert [epoch["epoch"] for epoch in metrics["epochs"]][:3] == [1, 2, 3]  # counted from 1, as the log lines
    assert metrics["best_epoch"] in range(1, len(metrics["epochs"]) + 1)
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
    assert metrics_of(tmp_path / "outputs" / "pretrained")["status"] == "finished"


# DDP with two CPU processes (gloo) for one epoch: one run directory, written by rank 0 alone, with metrics and
# predictions over the whole validation and test sets, not one rank's share; group DRO and mixup across donors
# train under it, the ranks keeping one set of donor weights.
# Small evaluation batches: the ranks get unequal numbers of cells to evaluate.
SETTINGS = ["run_name=ddp", "logger=csv", "data.eval_batch_size=16", "trainer.max_epochs=1"]
ROBUST = ["robust=group_dro", "robust.step_size=0.5", "augment.mixup_prob=0.5", "augment.mixup_across_donors=true"]


@pytest.mark.slow  # processes (or every command in turn): make test-slow, in CI
def test_two_process_ddp_evaluates_every_cell_once_and_keeps_one_set_of_donor_weights(tmp_path, shared_dirs):
    overrides = tiny_overrides(tmp_path / "outputs", shared_dirs) + SETTINGS + ROBUST
    result = run_script("train.py", *overrides, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                        "+callbacks.donor_weights._target_=donor_weights.SaveDonorWeights",
                        f"+callbacks.donor_weights.directory={tmp_path / 'weights'}")
    assert result.returncode == 0, result.stderr[-3000:]
    # group DRO sums the donors' losses over the ranks: both end with the same weights, moved from equal
    weights = [json.loads((tmp_path / "weights" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert weights[0] == weights[1] and len(set(weights[0])) == len(weights[0])
    run_dir = tmp_path / "outputs" / "ddp"
    # both ranks ran in the one run directory (rank 1 logs there too); no second run anywhere
    assert (run_dir / "train_ddp_process_1.log").is_file()
    assert sorted(path.name for path in (tmp_path / "outputs").iterdir() if not path.name.startswith(".")) == ["ddp"]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and [epoch["epoch"] for epoch in metrics["epochs"]] == [1]
    datamodule = build_datamodule(compose_train(overrides))
    for split in ("val", "test"):
        cells = datamodule.split_cells(split)
        shares = [sum(map(len, EvalBatchSampler(cells["length"].to_numpy(), 16, rank, 2))) for rank in (0, 1)]
        assert shares[0] != shares[1]  # ragged shares: the gather must pad and trim
        table = pd.read_csv(run_dir / "predictions" / f"{split}.csv")
        assert sorted(table["cell_id"]) == sorted(cells["cell_id"])  # every cell exactly once
        truth = table["true"].map(CLASSES.index).to_numpy()
        probabilities = table[[f"prob_{name}" for name in CLASSES]].to_numpy()
        assert sum(map(sum, metrics[split]["confusion_matrix"])) == len(cells)
        assert metrics[split]["accuracy"] == pytest.approx(accuracy_score(truth, probabilities.argmax(1)), abs=1e-4)
        assert metrics[split]["macro_f1"] == pytest.approx(
            f1_score(truth, probabilities.argmax(1), average="macro"), abs=1e-4)
        assert metrics[split]["macro_auroc"] == pytest.approx(
            roc_auc_score(truth, probabilities, multi_class="ovr", average="macro"), abs=1e-4)
    assert metrics["epochs"][0]["val/accuracy"] == pytest.approx(metrics["val"]["accuracy"], abs=1e-4)


# The real-data path, `data=kul3 model=geneformer_v1`, end to end on local files. A Geneformer checkout is imitated
# in a temporary folder: the real V1 gene dictionaries (from ../shared/geneformer) where Geneformer keeps them, and
# a small `BertForMaskedLM` with the real V1 vocabulary saved with `save_pretrained` as `Geneformer-V1-10M/`. The GEO
# files carry real gene symbols, which ingest maps to Ensembl ids through the real `gene_name_id_dict`.
@pytest.fixture
def geneformer_checkout(tmp_path, geneformer_dicts):
    from transformers import BertConfig, BertForMaskedLM

    checkout = tmp_path / "Geneformer"
    dictionaries = checkout / "geneformer" / "gene_dictionaries_30m"
    dictionaries.mkdir(parents=True)
    for name in ("token_dictionary", "gene_median_dictionary", "ensembl_mapping_dict", "gene_name_id_dict"):
        (dictionaries / f"{name}_gc30M.pkl").symlink_to(geneformer_dicts / f"{name}_gc30M.pkl")
    vocab_size = len(load_pickle_dict(geneformer_dicts / "token_dictionary_gc30M.pkl"))
    BertForMaskedLM(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=2048, hidden_act="relu",
                               pad_token_id=0)).save_pretrained(checkout / "Geneformer-V1-10M")
    return checkout


def test_kul3_with_geneformer_v1_trains_on_real_dictionaries(tmp_path, shared_dirs, geneformer_checkout):
    geo = tmp_path / "kul3"
    write_synthetic_kul3(geo, n_cells=300, n_genes=300, seed=1)
    # the same cohort, its genes renamed to real symbols that the V1 vocabulary knows
    token = load_pickle_dict(geneformer_checkout / "geneformer/gene_dictionaries_30m/token_dictionary_gc30M.pkl")
    names = load_pickle_dict(geneformer_checkout / "geneformer/gene_dictionaries_30m/gene_name_id_dict_gc30M.pkl")
    symbols = sorted(symbol for symbol, gene in names.items() if gene in token)[:300]
    cohort = generate_counts(300, 300, seed=1)
    write_geo_matrix(geo / "GSE144735_processed_KUL3_CRC_10X_raw_UMI_count_matrix.txt.gz", cohort.counts, symbols,
                     list(cohort.annotation["Index"]))

    overrides = tiny_overrides(tmp_path / "outputs", shared_dirs)
    overrides = [o for o in overrides if not o.startswith(("data.source", "model."))]
    cfg = compose_train(overrides + ["experiment=colon6", "data=kul3", "model=geneformer_v1",
                                     f"paths.geneformer_dir={geneformer_checkout}", f"data.source.data_dir={geo}"])
    train(cfg)
    metrics = json.loads((tmp_path / "outputs" / "colon6" / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    config = (tmp_path / "outputs" / "colon6" / "config.yaml").read_text()
    assert "Geneformer-V1-10M" in config and "gene_dictionaries_30m/token_dictionary_gc30M.pkl" in config
    saved = load_pickle_dict(tmp_path / "outputs" / "colon6" / "dictionaries" / "token_dictionary.pkl")
    assert len(saved) == len(token)


def test_a_calibration_needs_a_validation_donor_but_under_lodo_each_fold_names_its_own(tiny_cfg):
    check_recipe(tiny_cfg("calibration=temperature", "data.val_donors=[]", "cv=lodo"))
    with pytest.raises(InputError, match="calibration=temperature is fitted on the validation donors' cells"):
        check_recipe(tiny_cfg("calibration=temperature", "data.val_donors=[]"))
