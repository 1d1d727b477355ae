"""The run directory (rundir.py): a run is never mixed with another, a resume keeps the run's recipe,
success criteria are recorded, checkpoints are read safely, runs are found under sweep roots."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import bad_checkpoints, compose_train, run_metrics, tiny_overrides, train_tiny

from geneformer_colon.common.errors import InputError
from geneformer_colon.jobs.train import train
from geneformer_colon.runs.checkpoints import read_checkpoint, resolve_checkpoint
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.reading import Run, find_runs
from geneformer_colon.runs.record import best_epoch, check_success
from geneformer_colon.runs.start import prepare_run_dir


def test_a_finished_run_is_not_overwritten_by_accident(tmp_path, shared_dirs):
    train_tiny(tmp_path, shared_dirs, "run_name=once", "trainer.fast_dev_run=true")
    with pytest.raises(InputError, match="overwrite=true"):
        train_tiny(tmp_path, shared_dirs, "run_name=once", "trainer.fast_dev_run=true")
    train_tiny(tmp_path, shared_dirs, "run_name=once", "trainer.fast_dev_run=true", "overwrite=true")


def test_success_criteria_are_checked_and_recorded(tmp_path, shared_dirs):
    train_tiny(tmp_path, shared_dirs, "run_name=criteria", "trainer.fast_dev_run=true",
        "+success_criteria={val/accuracy: 0.0, test/macro_f1: 1.01}")
    success = run_metrics(tmp_path, "criteria")["success"]
    assert success["val/accuracy"]["passed"] is True
    assert success["test/macro_f1"]["passed"] is False


def test_resume_refuses_a_changed_recipe_unless_allowed_and_then_records_it(tmp_path, shared_dirs):
    common = tiny_overrides(tmp_path / "outputs", shared_dirs) + ["run_name=recipe", "trainer.limit_train_batches=3"]
    train(compose_train(common))
    with pytest.raises(InputError) as refused:
        train(compose_train(common + ["resume=true", "optimizer.lr=1e-3", "data.batch_size=8"]))
    message = str(refused.value)
    assert "optimizer.lr: 0.002 -> 0.001" in message and "data.batch_size: 32 -> 8" in message
    assert "allow_resume_changes=true" in message and "\n" not in message
    train(compose_train(common + ["resume=true", "optimizer.lr=1e-3", "allow_resume_changes=true"]))
    saved = (tmp_path / "outputs/recipe/config.yaml").read_text()
    assert "resume_changes:\n- optimizer.lr:\n  - '0.002'\n  - '0.001'" in saved

    # a cross-validated run: a new recipe is refused for its folds too, and a plain run is no CV run's home
    cv = common + ["cv=lodo", "cv.folds=[KUL01]", "run_name=cv", "trainer.limit_train_batches=2"]
    from geneformer_colon.jobs import donor_cv as cross_validation

    cross_validation.run(train, compose_train(cv))
    with pytest.raises(InputError, match=r"optimizer.lr: 0.002 -> 0.001"):
        cross_validation.run(train, compose_train(cv + ["resume=true", "cv.folds=[KUL19]", "optimizer.lr=1e-3"]))
    with pytest.raises(InputError, match="not cross-validated"):
        cross_validation.run(train, compose_train(common + ["cv=lodo", "cv.folds=[KUL01]"]))


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


def test_a_failed_start_is_cleared_and_a_run_is_refused(tmp_path):
    layout = RunLayout(tmp_path / "run")
    layout.dictionaries.mkdir(parents=True)
    layout.config.write_text("seed: 0\n")
    assert not layout.holds_a_run()
    prepare_run_dir(layout, overwrite=False)  # what a start that failed before training left
    assert not layout.root.exists() or layout.written() == []
    layout.checkpoints.mkdir(parents=True)
    (layout.checkpoints / "last.ckpt").write_bytes(b"")
    assert layout.holds_a_run()
    with pytest.raises(InputError, match="already holds a run"):
        prepare_run_dir(layout, overwrite=False)
    prepare_run_dir(layout, overwrite=True)
    assert layout.written() == []


def test_the_best_epoch_and_the_success_criteria():
    epochs = [{"epoch": 0, "val/macro_f1": 0.5, "val/loss": 2.0}, {"epoch": 1, "val/macro_f1": 0.7, "val/loss": 1.0},
              {"epoch": 2, "val/macro_f1": 0.7, "val/loss": 1.0}]
    assert best_epoch(epochs) == 1 and best_epoch(epochs, "val/loss", "min") == 1 and best_epoch([]) is None
    final = {"val": {"accuracy": 0.6}, "test": {"macro_f1": 0.4}}
    verdicts = check_success({"val/accuracy": 0.5, "test/macro_f1": 0.5}, final)
    assert [verdict["passed"] for verdict in verdicts.values()] == [True, False]
    with pytest.raises(InputError, match="names no final metric"):
        check_success({"val/f2": 0.5}, final)


def test_runs_are_found_at_any_depth_and_a_runs_own_folders_are_part_of_it(tmp_path):
    for name in ("sweep/0_a=1", "sweep/1_a=2", "sweep/1_a=2/eval/test-KUL21", "cv/folds/KUL01"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "metrics.json").write_text(json.dumps({"status": "finished"}))
    (tmp_path / "cv" / "cv.json").write_text("{}")
    found = find_runs([tmp_path])
    assert sorted(path.relative_to(tmp_path).as_posix() for path in found) == ["cv", "sweep/0_a=1", "sweep/1_a=2"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no run directory"):
        find_runs([tmp_path / "empty"])


def test_a_cv_run_of_one_fold_has_a_mean_and_no_spread(tmp_path):
    run = Run(tmp_path, {}, {}, {"folds": [{}], "aggregate": {"val": {"macro_f1": {"n": 1, "mean": 0.5, "sd": None}}}})
    assert run.headline("val", "macro_f1") == 0.5
    assert math.isnan(run.spread("val", "macro_f1")) and math.isnan(run.headline("test", "macro_f1"))
