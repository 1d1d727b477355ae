"""Reliability: a paused run resumes exactly, a run directory moves safely, bad values get one line,
concurrent runs share the cache. The signals are real, sent to real `train.py` processes."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import bad_checkpoints, compose_train, fingerprints, run_script, tiny_overrides
from omegaconf import OmegaConf

from geneformer_colon.assembly.builders import read_checkpoint
from geneformer_colon.common.errors import Interrupted, input_error_in
from geneformer_colon.jobs.train import train

# Every random stream of a training step in use (masking, mixup, dropout), gradient accumulation,
# and the class-donor sampler; three epochs.
RECIPE = ["trainer.max_epochs=3", "callbacks.early_stopping=null", "augment.token_mask_prob=0.05",
          "augment.mixup_prob=0.5", "data.balance_strategy=class_donor", "trainer.accumulate_grad_batches=2",
          "logger=csv"]


def pause_at(marker: Path, epoch: int = 1, batch: int = 4) -> list[str]:
    return ["+callbacks.pause._target_=pause.PauseAtStep", f"+callbacks.pause.epoch={epoch}",
            f"+callbacks.pause.batch={batch}", f"+callbacks.pause.marker={marker}"]


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def wait_for(path: Path, process, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended before reaching the pause (exit {process.returncode})"
        assert time.monotonic() < deadline, "the run never reached the pause"
        time.sleep(0.1)


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
    assert position["batches"] == 6 and position["batches"] < metrics(outputs / "straight")["cells"]["train"] / 32
    assert metrics(run_dir)["status"] == "running"

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

    expected = metrics(outputs / "straight")
    for finished in (metrics(run_dir), metrics(copy)):
        assert finished["status"] == "finished"
        assert finished["epochs"] == expected["epochs"]  # every epoch's val metrics, to the last digit kept
        assert finished["best_epoch"] == expected["best_epoch"]
        for split in ("val", "test"):
            assert finished[split] == expected[split], split
    assert metrics(copy)["best_checkpoint"] == "checkpoints/best.ckpt"

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
def test_a_pause_at_an_epochs_end_loses_no_validation_and_adds_no_epoch(tmp_path, shared_dirs, monkeypatch, where):
    """Ctrl-C in an epoch's last accumulation window: the epoch is validated before the run stops. Ctrl-C in
    the epoch where early stopping ends training: the run finishes, and a resume trains no other epoch."""
    import geneformer_colon.jobs.train as fine_tune

    stop = ["callbacks.early_stopping.patience=0", "+callbacks.early_stopping.min_delta=1"] \
        if where == "early_stop" else ["callbacks.early_stopping=null"]
    common = tiny_overrides(tmp_path / "outputs", shared_dirs) + ["trainer.max_epochs=3", "logger=csv",
                                                                 "trainer.accumulate_grad_batches=2", *stop]
    straight = train(compose_train(common + ["run_name=straight"]))
    real = fine_tune.build_trainer
    signal_at = SignalAt(1 if where == "early_stop" else 0, -1)  # in the epoch's last accumulation window
    monkeypatch.setattr(fine_tune, "build_trainer", lambda cfg, callbacks: real(cfg, callbacks + [signal_at]))
    if where == "last_batch":
        with pytest.raises(Interrupted):
            train(compose_train(common + ["run_name=paused"]))
        monkeypatch.setattr(fine_tune, "build_trainer", real)
        resumed = train(compose_train(common + ["run_name=paused", "resume=true"]))
    else:  # early stopping ends training in epoch 1 (patience 0): the pause has nothing left to stop
        resumed = train(compose_train(common + ["run_name=paused"]))
        monkeypatch.setattr(fine_tune, "build_trainer", real)
        assert resumed["status"] == "finished"
        resumed = train(compose_train(common + ["run_name=paused", "resume=true"]))
    assert [epoch["epoch"] for epoch in resumed["epochs"]] == [epoch["epoch"] for epoch in straight["epochs"]]
    assert resumed["epochs"] == straight["epochs"] and resumed["test"] == straight["test"]


# Each path to a one-line error: a value checked up front, an error raised inside an object Hydra
# builds (which Hydra wraps), and the two ways a checkpoint file is refused.
IN_A_PROCESS = {
    "optimizer.lr=0": "optimizer.lr is 0; set it to a number > 0",
    "augment.mixup_prob=2": "augment.mixup_prob is 2",
    "init_from={text}": "notes.ckpt: not a PyTorch Lightning checkpoint",
    "init_from={code}": "code.ckpt: holds objects a checkpoint written by train.py does not hold",
}
IN_THIS_PROCESS = {
    "data.batch_size=0": "data.batch_size is 0; set it to an integer >= 1",
    "trainer.max_epochs=0": "trainer.max_epochs is 0; set it to an integer >= 1",
    "model.tokenizer.input_size=0": "model.tokenizer.input_size is 0",
    "loss.focal_gamma=-1": "loss.focal_gamma is -1",
    "data.max_tokens=100": "data.max_tokens is 100, less than one cell",
}


@pytest.mark.slow  # many processes: run by make test-slow (CI too)
def test_each_bad_value_or_file_is_one_line_and_exit_2_then_the_fixed_run_works(tmp_path, shared_dirs):
    checkpoints = bad_checkpoints(tmp_path / "files")
    common = tiny_overrides(tmp_path / "outputs", shared_dirs) + ["run_name=same0", "logger=csv"]
    cases = [case.format(**checkpoints) for case in IN_A_PROCESS]
    logs = {case: open(tmp_path / f"{number}.log", "w+") for number, case in enumerate(cases)}
    for pair in (cases[:2], cases[2:]):  # two processes at a time, each on its own run directory (one holds it)
        running = {case: run_script("train.py", *common, case, f"run_name=same{number}", wait=False,
                                    stdout=logs[case], stderr=logs[case])
                   for number, case in enumerate(pair)}
        for case, process in running.items():
            assert process.wait(timeout=300) == 2, (case, logs[case].name)
    for case, expected in zip(cases, IN_A_PROCESS.values()):
        logs[case].seek(0)
        output = logs[case].read()
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and expected in errors[0], (case, output[-2000:])
        assert "Traceback" not in output and "Error in call to target" not in output, case
        assert "weights_only=False" not in output and "this must never run" not in output, case
    for case, expected in IN_THIS_PROCESS.items():
        with pytest.raises(Exception) as raised:
            train(compose_train(common + [case]))
        error = input_error_in(raised.value)
        assert error is not None and expected in str(error) and "\n" not in str(error), (case, raised.value)
    # the same run_name works once the value is fixed: a failed start blocks nothing
    train(compose_train(common + ["trainer.fast_dev_run=true"]))
    assert metrics(tmp_path / "outputs/same0")["status"] == "finished"


def test_two_runs_started_together_on_new_data_build_the_cache_once(tmp_path):
    shared = {"data": tmp_path / "data", "cache": tmp_path / "cache"}
    common = tiny_overrides(tmp_path / "outputs", shared) + ["data.source.seed=11", "debug=fdr"]
    logs = [open(tmp_path / f"{i}.log", "w") for i in range(2)]
    runs = [run_script("train.py", *common, f"run_name=together{i}", wait=False, stdout=logs[i], stderr=logs[i])
            for i in range(2)]
    for number, process in enumerate(runs):
        assert process.wait(timeout=300) == 0, (tmp_path / f"{number}.log").read_text()[-3000:]
    for name in ("ingest", "tokens", "dictionaries"):
        built = [path for path in (tmp_path / "cache" / name).iterdir() if not path.name.startswith(".")]
        assert len(built) == 1, (name, built)
    assert not list((tmp_path / "cache").rglob("*.tmp-*"))
    assert pickle.loads((tmp_path / "outputs/together0/dictionaries/token_dictionary.pkl").read_bytes()) == \
        pickle.loads((tmp_path / "outputs/together1/dictionaries/token_dictionary.pkl").read_bytes())
