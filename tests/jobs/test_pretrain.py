"""Masked-gene pretraining (pretrain.py): a run whose held-out loss falls, its Hugging Face checkpoint, fine-tuning
from it, resuming it, and dictionaries that disagree (the masking itself: model/test_masked_genes.py)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import pytorch_lightning as pl
import torch
from helpers.tiny import compose_train, tiny_overrides
from transformers import BertForMaskedLM

from geneformer_colon.assembly.builders import build_datamodule, build_module
from geneformer_colon.common.errors import InputError, Interrupted
from geneformer_colon.data.dictionaries import GeneDictionaries
from geneformer_colon.jobs.pretrain import pretrain
from geneformer_colon.jobs.train import train


def pretrain_overrides(tmp_path, shared, *more: str) -> list[str]:
    return tiny_overrides(tmp_path / "outputs", shared) + ["logger=csv", "trainer.max_epochs=2",
                                                         "callbacks.early_stopping=null", *more]


def compose_pretrain(overrides: list[str]):
    return compose_train(overrides, config_name="pretrain")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, shared_dirs):
    tmp_path = tmp_path_factory.mktemp("pretrain")
    record = pretrain(compose_pretrain(pretrain_overrides(tmp_path, shared_dirs, "optimizer.lr=3e-3")))
    return tmp_path, record


def test_two_epochs_lower_the_held_out_loss_and_leave_a_hugging_face_checkpoint(pretrained):
    tmp_path, record = pretrained
    run_dir = tmp_path / "outputs" / "pretrain"
    assert record["kind"] == "pretrain" and record["donors"]["val"] == ["KUL19"] and "test" not in record["donors"]
    assert sorted(record["donors"]["train"]) == ["KUL01", "KUL21", "KUL28", "KUL30", "KUL31"]
    losses = [epoch["val/masked_loss"] for epoch in record["epochs"]]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert json.loads((run_dir / "metrics.json").read_text())["best_epoch"] == 2  # the second (from 1)
    model = BertForMaskedLM.from_pretrained(run_dir / "hf")  # transformers alone
    assert (run_dir / "hf" / "model.safetensors").is_file()
    dictionaries = GeneDictionaries.load(run_dir / "hf" / "token_dictionary.pkl",
                                         run_dir / "hf" / "gene_median_dictionary.pkl")
    assert model.config.vocab_size == len(dictionaries.token)


def test_fine_tuning_starts_from_the_pretrained_encoder(pretrained, shared_dirs, capsys, caplog):
    tmp_path, _ = pretrained
    hf = tmp_path / "outputs" / "pretrain" / "hf"
    overrides = [o for o in tiny_overrides(tmp_path / "outputs", shared_dirs) if not o.startswith("model.encoder.")]
    cfg = compose_train(overrides + ["experiment=colon6", "model=pretrained", f"model.encoder.pretrained={hf}",
                                     "model.tokenizer.input_size=128", "run_name=from_pretrained", "logger=csv"])
    encoder = build_module(cfg, build_datamodule(cfg)).encoder.bert.state_dict()
    # the masked-gene head the encoder leaves out is no news: no load report, no progress bar
    assert not [record for record in caplog.records if "LOAD REPORT" in record.getMessage()]
    assert "Loading weights" not in capsys.readouterr().err
    for name, tensor in BertForMaskedLM.from_pretrained(hf).bert.state_dict().items():
        torch.testing.assert_close(encoder[name], tensor, msg=name)
    assert train(cfg)["status"] == "finished"

    # the run tokenizes with other medians than the checkpoint's own
    dictionaries = GeneDictionaries.load(hf / "token_dictionary.pkl", hf / "gene_median_dictionary.pkl")
    GeneDictionaries(dictionaries.token, {gene: 2 * value for gene, value in dictionaries.median.items()}).save(
        tmp_path / "other")
    bad = compose_train(overrides + ["model=pretrained", f"model.encoder.pretrained={hf}",
                                     "model.tokenizer.input_size=128",
                                     f"model.tokenizer.gene_median_dictionary={tmp_path / 'other'}/"
                                     "gene_median_dictionary.pkl", "run_name=bad", "logger=csv"])
    with pytest.raises(InputError, match=r"gene_median_dictionary.pkl differ from the dictionaries this run"):
        train(bad)


class SignalAtStep(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 2:
            os.kill(os.getpid(), signal.SIGINT)


def test_an_interrupted_pretraining_resumes(tmp_path, shared_dirs, monkeypatch):
    import geneformer_colon.jobs.train as fine_tune

    overrides = pretrain_overrides(tmp_path, shared_dirs, "run_name=paused")
    real = fine_tune.build_trainer
    monkeypatch.setattr(fine_tune, "build_trainer", lambda cfg, callbacks: real(cfg, callbacks + [SignalAtStep()]))
    with pytest.raises(Interrupted):
        pretrain(compose_pretrain(overrides))
    monkeypatch.setattr(fine_tune, "build_trainer", real)
    run_dir = tmp_path / "outputs" / "paused"
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "running"
    assert not (run_dir / "hf").exists()
    record = pretrain(compose_pretrain(overrides + ["resume=true"]))
    assert record["status"] == "finished" and [epoch["epoch"] for epoch in record["epochs"]] == [1, 2]
    assert (run_dir / "hf" / "model.safetensors").is_file()
