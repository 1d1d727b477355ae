"""A run's checkpoints (checkpoints.py): found, read safely (tensors and plain data only), or refused in one line."""

from __future__ import annotations

import pytest
import torch
from helpers.runs import bad_checkpoints

from geneformer_colon.common.errors import InputError
from geneformer_colon.runs.checkpoints import read_checkpoint, resolve_checkpoint


def test_a_checkpoint_is_read_safely_or_refused_in_one_line(tmp_path):
    files = bad_checkpoints(tmp_path)
    with pytest.raises(InputError, match="notes.ckpt: not a PyTorch Lightning checkpoint"):
        read_checkpoint(files["text"])
    with pytest.raises(InputError, match="code.ckpt: holds objects a checkpoint written by train.py does not hold"):
        read_checkpoint(files["code"])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.ckpt")
    with pytest.raises(InputError, match="no state_dict"):
        read_checkpoint(tmp_path / "plain.ckpt")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "run" / "checkpoints" / "best.ckpt")
    assert resolve_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "best.ckpt"
    assert read_checkpoint(resolve_checkpoint(tmp_path / "run"))["epoch"] == 3
    with pytest.raises(InputError, match="no checkpoint there"):
        resolve_checkpoint(tmp_path / "run", "last")


def test_best_holds_the_weights_alone_and_a_finished_cv_fold_keeps_only_its_best(trained_runs, two_fold_cv_run):
    checkpoints = trained_runs[0] / "checkpoints"
    best, last = read_checkpoint(checkpoints / "best.ckpt"), read_checkpoint(checkpoints / "last.ckpt")
    assert {"state_dict", "hyper_parameters", "epoch_history"} <= best.keys()  # what predict and export read
    assert not {"optimizer_states", "lr_schedulers", "callbacks"} & best.keys()
    assert {"optimizer_states", "lr_schedulers", "callbacks"} <= last.keys()  # what resume=true reads
    assert (checkpoints / "best.ckpt").stat().st_size < 0.5 * (checkpoints / "last.ckpt").stat().st_size
    mapped = read_checkpoint(checkpoints / "best.ckpt", mapped=True)["state_dict"]
    assert all(torch.equal(mapped[name], tensor) for name, tensor in best["state_dict"].items())
    folds = sorted((two_fold_cv_run / "folds").iterdir())
    assert [fold.name for fold in folds] == ["KUL01", "KUL19"]
    assert all(sorted(path.name for path in (fold / "checkpoints").iterdir()) == ["best.ckpt"] for fold in folds)
