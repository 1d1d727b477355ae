"""What a user sees around the numbers: a log line an epoch wherever the output goes, a CV run's table at
its end, files colleagues can read."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
from conftest import run_script, tiny_overrides

from geneformer_colon.export import export_run
from geneformer_colon.names import EVAL_SPLITS as SPLITS
from geneformer_colon.rundir import RunLayout, train_losses

CV = ["experiment=colon6", "cv=lodo", "cv.folds=[KUL01]", "logger=csv", "trainer.limit_train_batches=4",
      "trainer.max_epochs=2"]
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+): train loss [\d.]+, val acc ([\d.]+), val macro F1 ([\d.]+), "
                        r"val ROC AUC [\d.]+, val loss [\d.]+, recall Normal [\d.]+ Border [\d.]+ Tumor [\d.]+; "
                        r"\d+:\d\d:\d\d elapsed, ~\d+:\d\d:\d\d left")


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, shared_dirs) -> tuple[Path, str]:
    """A one-fold CV run of two epochs a fold, its stdout and stderr redirected to a file, umask 022; its
    progress bar configured (the default), to show that it stays out of a file."""
    out = tmp_path_factory.mktemp("user_view")
    log_file = out / "train.out"
    overrides = [o for o in tiny_overrides(out, shared_dirs) if not o.startswith("callbacks.progress_bar")]
    with log_file.open("w") as handle:
        result = run_script("train.py", *overrides, *CV, "run_name=cv", wait=False,
                            stdout=handle, stderr=handle, umask=0o022)
        assert result.wait(timeout=600) == 0, log_file.read_text()[-3000:]
    return out / "cv", log_file.read_text()


def test_a_redirected_run_logs_a_line_an_epoch_equal_to_metrics_json(cv_run):
    run_dir, output = cv_run
    lines = [match.groups() for match in EPOCH_LINE.finditer(output)]
    expected = []
    for fold in ("KUL01",):
        epochs = json.loads((run_dir / "folds" / fold / "metrics.json").read_text())["epochs"]
        expected += [(str(epoch["epoch"] + 1), "2", f"{epoch['val/accuracy']:.4f}", f"{epoch['val/macro_f1']:.4f}")
                     for epoch in epochs]
    assert len(expected) == 2 and lines == expected
    assert "Epoch " not in output  # no progress bar in a file


def test_a_cv_run_ends_with_its_table_across_folds(cv_run):
    run_dir, output = cv_run
    tail = output.rstrip().splitlines()[-16:]
    assert any("across folds" in line for line in tail)
    table = [line for line in tail if line.startswith("| ")]
    assert table[0].startswith("| figure | folds | mean | sd")
    cv = json.loads((run_dir / "cv.json").read_text())
    row = next(line for line in table if line.startswith("| test macro F1 |"))
    assert f"| {cv['aggregate']['test']['macro_f1']['mean']:.3f} |" in row
    assert output.rstrip().endswith(table[-1])


def _unreadable_by_others(root: Path) -> list[str]:
    return [str(path) for path in root.rglob("*") if path.is_file() and not path.stat().st_mode & stat.S_IROTH]


def test_files_of_a_run_and_an_export_are_readable_by_group_and_others(cv_run, tmp_path):
    run_dir, _ = cv_run
    assert not _unreadable_by_others(run_dir)
    mask = os.umask(0o022)
    try:
        export = export_run(run_dir / "folds" / "KUL01", tmp_path / "export")
    finally:
        os.umask(mask)
    assert (export / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert not _unreadable_by_others(export)


def test_a_run_draws_its_loss_and_per_class_roc_and_pr_curves(cv_run):
    fold = RunLayout(cv_run[0] / "folds" / "KUL01")
    assert sorted(train_losses(fold)) == [0, 1]
    for plot in (fold.loss_plot, *(fold.curve_plot(curve, split) for curve in ("roc", "pr") for split in SPLITS)):
        assert plot.stat().st_size > 1000, plot


def test_the_model_card_and_history_name_the_data_source(cv_run, tmp_path):
    fold = cv_run[0] / "folds" / "KUL01"
    data = json.loads((fold / "metrics.json").read_text())["data"]
    assert data["source"] == "synthetic" and data["n_cells"] == 480 and data["generator_version"]
    card = (export_run(fold, tmp_path / "export") / "README.md").read_text()
    for text in (card, (fold / "history.md").read_text(), (cv_run[0] / "history.md").read_text()):
        assert "**Data:** the embedded synthetic KUL3 look-alike, not real cells" in text
        assert "480 cells x 300 genes, seed 0" in text
