"""What a run writes as it goes (record.py): the best epoch, the success criteria checked and recorded, the loss
plot (with the per-class curves every scored split draws)."""

from __future__ import annotations

import pytest
from helpers.runs import metrics_of

from geneformer_colon.common.errors import InputError
from geneformer_colon.common.names import EVAL_SPLITS
from geneformer_colon.jobs.train import train
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.record import best_epoch, check_success, train_losses


def test_success_criteria_are_checked_and_recorded(tiny_cfg, tmp_path):
    train(tiny_cfg("run_name=criteria", "trainer.fast_dev_run=true",
                   "+success_criteria={val/accuracy: 0.0, test/macro_f1: 1.01}"))
    success = metrics_of(tmp_path / "outputs" / "criteria")["success"]
    assert success["val/accuracy"]["passed"] is True
    assert success["test/macro_f1"]["passed"] is False


def test_the_best_epoch_and_the_success_criteria():
    epochs = [{"epoch": 0, "val/macro_f1": 0.5, "val/loss": 2.0}, {"epoch": 1, "val/macro_f1": 0.7, "val/loss": 1.0},
              {"epoch": 2, "val/macro_f1": 0.7, "val/loss": 1.0}]
    assert best_epoch(epochs) == 1 and best_epoch(epochs, "val/loss", "min") == 1 and best_epoch([]) is None
    final = {"val": {"accuracy": 0.6}, "test": {"macro_f1": 0.4}}
    verdicts = check_success({"val/accuracy": 0.5, "test/macro_f1": 0.5}, final)
    assert [verdict["passed"] for verdict in verdicts.values()] == [True, False]
    with pytest.raises(InputError, match="names no final metric"):
        check_success({"val/f2": 0.5}, final)


def test_a_run_draws_its_loss_and_per_class_roc_and_pr_curves(logged_cv_run):
    fold = RunLayout(logged_cv_run[0] / "folds" / "KUL01")
    assert sorted(train_losses(fold)) == [0, 1]
    for plot in (fold.loss_plot, *(fold.curve_plot(curve, split) for curve in ("roc", "pr") for split in EVAL_SPLITS)):
        assert plot.stat().st_size > 1000, plot
