"""Lightning callbacks (callbacks.py): a run paused by SIGTERM or Ctrl-C resumes exactly where the run left alone
would be (the signals are real, sent to real `train.py` processes), a pause at an epoch's end loses no
validation, and what a user sees: a log line an epoch, a progress bar counting from one."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from helpers.processes import pause_at, run_script, wait_for
from helpers.runs import fingerprints, metrics_of
from helpers.tiny import tiny_overrides
from omegaconf import OmegaConf

from geneformer_colon.assembly.builders import read_checkpoint
from geneformer_colon.common.errors import Interrupted
from geneformer_colon.jobs.train import train
from geneformer_colon.model.callbacks import EpochProgressBar

# Every random stream of a training step in use (masking, mixup, dropout), gradient accumulation,
# and the class-donor sampler; three epochs.
RECIPE = ["trainer.max_epochs=3", "callbacks.early_stopping=null", "augment.token_mask_prob=0.05",
          "augment.mixup_prob=0.5", "data.balance_strategy=class_donor", "trainer.accumulate_grad_batches=2",
          "logger=csv"]


# LoRA adapters, group DRO's donor weights (checkpointed state) and mixup across donors.
ROBUST = ["model.lora.r=2", "robust=group_dro", "robust.step_size=0.5", "augment.mixup_across_donors=true"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ROBUST], ids=["plain", "lora_dro"])
def test_sigterm_mid_epoch_then_resume_ends_exactly_where_the_run_left_alone_would(tmp_path, shared_dirs, extra):
    outputs = tmp_path / "outputs"
    common = tiny_overrides(outputs, shared_dirs) + RECIPE + extra
    marker = tmp_path / "paused.marker"
    log = open(tmp_path / "paused.log", "w")
    paused = run_script("train.py", *common, "run_name=paused", *pause_at(marker), wait=False, stdout=log,
                        stderr=log)
    straight = run_script("train.py", *common, "run_name=straight", *pause_at(tmp_path / "never", epoch=99))
    assert straight.returncode == 0, straight.stderr[-3000:]

    wait_for(marker, paused)
    paused.send_signal(signal.SIGTERM)
    (tmp_path / "paused.marker.sent").touch()
    assert paused.wait(timeout=300) == 128 + signal.SIGTERM, (tmp_path / "paused.log").read_text()[-3000:]
    log.close()
    assert "resume=true" in (tmp_path / "paused.log").read_text()

    # last.ckpt holds the middle of the second epoch, at the end of a gradient-accumulation window
    run_dir = outputs / "paused"
    last = read_checkpoint(run_dir / "checkpoints/last.ckpt")
    position = last["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert last["epoch"] == 1 and position["epoch"] == 1
    assert position["batches"] == 6 and position["batches"] < metrics_of(outputs / "straight")["cells"]["train"] / 32
    assert metrics_of(run_dir)["status"] == "running"

    # A copy of the interrupted run directory, resumed elsewhere, writes into itself only.
    copy = tmp_path / "elsewhere" / "paused-copy"
    shutil.copytree(run_dir, copy)
    before = fingerprints(run_dir)
    resumed_copy = run_script("train.py", *tiny_overrides(tmp_path / "elsewhere", shared_dirs), *RECIPE, *extra,
                              "run_name=paused-copy", *pause_at(marker), "resume=true")
    assert resumed_copy.returncode == 0, resumed_copy.stderr[-3000:]
    assert fingerprints(run_dir) == before
    if not extra:  # as if the run had started before these keys existed: at their defaults they are no change
        saved = OmegaConf.load(run_dir / "config.yaml")
        for key in ("robust", "model.lora", "augment.mixup_across_donors"):
            parent, _, leaf = key.rpartition(".")
            del (OmegaConf.select(saved, parent) if parent else saved)[leaf]
        OmegaConf.save(saved, run_dir / "config.yaml")
    resumed = run_script("train.py", *common, "run_name=paused", *pause_at(marker), "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = metrics_of(outputs / "straight")
    for finished in (metrics_of(run_dir), metrics_of(copy)):
        assert finished["status"] == "finished"
        assert finished["epochs"] == expected["epochs"]  # every epoch's val metrics, to the last digit kept
        assert finished["best_epoch"] == expected["best_epoch"]
        for split in ("val", "test"):
            assert finished[split] == expected[split], split
    assert metrics_of(copy)["best_checkpoint"] == "checkpoints/best.ckpt"

    # last.ckpt is the latest state, whichever epoch was best
    last = read_checkpoint(outputs / "straight/checkpoints/last.ckpt")
    assert last["epoch"] == 2
    resumed_state = read_checkpoint(run_dir / "checkpoints/last.ckpt")["state_dict"]
    for name, tensor in last["state_dict"].items():  # the weights (and group DRO's donor weights) alike
        assert torch.equal(tensor, resumed_state[name]), name


class SignalAt(pl.Callback):
    """Ctrl-C (a real SIGINT to this process) at one training batch, once; batch -1: the epoch's last."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch, self.sent = epoch, batch, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        at = self.batch % trainer.num_training_batches
        if (trainer.current_epoch, batch_idx) == (self.epoch, at) and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("where", ["last_batch", "early_stop"])
def test_a_pause_at_an_epochs_end_loses_no_validation_and_adds_no_epoch(tiny_cfg, monkeypatch, where):
    """Ctrl-C in an epoch's last accumulation window: the epoch is validated before the run stops. Ctrl-C in
    the epoch where early stopping ends training: the run finishes, and a resume trains no other epoch."""
    import geneformer_colon.jobs.train as fine_tune

    stop = ["callbacks.early_stopping.patience=0", "+callbacks.early_stopping.min_delta=1"] \
        if where == "early_stop" else ["callbacks.early_stopping=null"]
    common = ["trainer.max_epochs=3", "logger=csv", "trainer.accumulate_grad_batches=2", *stop]
    straight = train(tiny_cfg(*common, "run_name=straight"))
    real = fine_tune.build_trainer
    signal_at = SignalAt(1 if where == "early_stop" else 0, -1)  # in the epoch's last accumulation window
    monkeypatch.setattr(fine_tune, "build_trainer", lambda cfg, callbacks: real(cfg, callbacks + [signal_at]))
    if where == "last_batch":
        with pytest.raises(Interrupted):
            train(tiny_cfg(*common, "run_name=paused"))
        monkeypatch.setattr(fine_tune, "build_trainer", real)
        resumed = train(tiny_cfg(*common, "run_name=paused", "resume=true"))
    else:  # early stopping ends training in epoch 1 (patience 0): the pause has nothing left to stop
        resumed = train(tiny_cfg(*common, "run_name=paused"))
        monkeypatch.setattr(fine_tune, "build_trainer", real)
        assert resumed["status"] == "finished"  # resume=true alone refuses a finished run: overwrite=true goes on
        resumed = train(tiny_cfg(*common, "run_name=paused", "resume=true", "overwrite=true"))
    assert [epoch["epoch"] for epoch in resumed["epochs"]] == [epoch["epoch"] for epoch in straight["epochs"]]
    assert resumed["epochs"] == straight["epochs"] and resumed["test"] == straight["test"]


EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+): train loss [\d.]+, val acc ([\d.]+), val macro F1 ([\d.]+), "
                        r"val ROC AUC [\d.]+, val loss [\d.]+, recall Normal [\d.]+ Border [\d.]+ Tumor [\d.]+; "
                        r"\d+:\d\d:\d\d elapsed, ~\d+:\d\d:\d\d left")


def test_a_redirected_run_logs_a_line_an_epoch_equal_to_metrics_json(logged_cv_run):
    run_dir, output = logged_cv_run
    lines = [match.groups() for match in EPOCH_LINE.finditer(output)]
    expected = []
    for fold in ("KUL01",):
        epochs = json.loads((run_dir / "folds" / fold / "metrics.json").read_text())["epochs"]
        expected += [(str(epoch["epoch"]), "2", f"{epoch['val/accuracy']:.4f}", f"{epoch['val/macro_f1']:.4f}")
                     for epoch in epochs]
    assert len(expected) == 2 and lines == expected
    assert "Epoch " not in output  # no progress bar in a file


def test_the_progress_bar_counts_epochs_from_one():
    bar = EpochProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=4)
    assert bar._get_train_description(0).strip() == "Epoch 1/4" and bar._get_train_description(3).strip() == "Epoch 4/4"
