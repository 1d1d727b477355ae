"""`geneformer-colon history`: a run as a training-log entry, history.md, --append."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from geneformer_colon.cli import verbs as cli
from geneformer_colon.report.history import run_history
from geneformer_colon.runs.reading import read_run


def tables(entry: str) -> list[list[list[str]]]:
    """The markdown tables of an entry, each as rows of cells (header first, separator dropped)."""
    found, current = [], []
    for line in entry.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                current.append([cell.strip() for cell in line.strip("|").split(" | ")])
        elif current:
            found.append(current)
            current = []
    return found


def test_entry_holds_the_log_fields(trained_runs):
    run_dir = trained_runs[1]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    entry = run_history(run_dir)

    assert re.match(rf"## \d{{4}}-\d\d-\d\d \d\d:\d\d · {re.escape(metrics['run_name'])}\n", entry)
    assert "**Started from:** random init" in entry
    assert "**Donors:** val KUL19, test KUL01" in entry
    assert f"`{metrics['best_checkpoint']}` (epoch {metrics['best_epoch']})" in entry
    recipe, epochs, final = tables(entry)[:3]

    # the recipe as the team's log records it, from the run's own config
    rows = dict(recipe[1:])
    for key, value in (("loss.focal_gamma", "1.5"), ("augment.mixup_prob", "0.3"), ("trainer.max_epochs", "2"),
                       ("loss.class_weights.Tumor", "2.2"), ("data.balance_strategy", "class_donor"),
                       ("optimizer.lr", "0.002"), ("model.tokenizer.input_size", "128")):
        assert rows[key] == value, key
    assert not [key for key in rows if key.startswith(("paths.", "run_name", "callbacks.model_checkpoint.dirpath"))]

    # per-epoch val metrics, best epoch marked
    assert epochs[0][:4] == ["epoch", "acc", "macro F1", "ROC AUC"] and "recall Tumor" in epochs[0]
    assert len(epochs) - 1 == len(metrics["epochs"])
    for row, epoch in zip(epochs[1:], metrics["epochs"]):
        assert row[0] == f"{epoch['epoch']}" + (" (best)" if epoch["epoch"] == metrics["best_epoch"] else "")
        assert row[2] == f"{epoch['val/macro_f1']:.3f}" and row[3] == f"{epoch['val/macro_auroc']:.3f}"

    # final val and test metrics with ROC AUC, per-class precision and recall: a row a metric
    assert final[0] == ["metric", "val (KUL19)", "test (KUL01)"]
    cells = {row[0]: row[1:] for row in final[1:]}
    for column, split in enumerate(("val", "test")):
        assert cells["ROC AUC"][column] == f"{metrics[split]['macro_auroc']:.3f}"
        for name in ("Normal", "Border", "Tumor"):
            assert cells[f"precision {name}"][column] == f"{metrics[split][f'precision/{name}']:.3f}"
            assert cells[f"recall {name}"][column] == f"{metrics[split][f'recall/{name}']:.3f}"
    assert "**test by cell type:**" in entry  # the breakdown metrics.json holds

    for key, verdict in metrics["success"].items():
        assert f"- {'PASS' if verdict['passed'] else 'FAIL'} `{key}` = {verdict['value']:.3f}" in entry


def test_history_md_is_the_entry_and_appends_to_a_training_log(trained_runs, tmp_path, capsys):
    run_dir = trained_runs[0]
    written = (run_dir / "history.md").read_text()  # the run wrote it from the config in hand
    entry = run_history(run_dir)
    assert written.split("\n", 1)[1] == entry.split("\n", 1)[1]  # the same but for the heading's time

    log = tmp_path / "TRAINING_HISTORY.md"
    log.write_text("# Training history\n\nolder entries\n")
    cli.main(["history", str(run_dir), "--append", str(log)])
    assert entry in capsys.readouterr().out
    cli.main(["history", str(run_dir), "--append", str(log)])
    text = log.read_text()
    assert text.startswith("# Training history\n\nolder entries\n\n## ")
    assert text.count(entry) == 2
    assert not list(tmp_path.glob(".*tmp*"))  # rewritten atomically, no temporary left behind


def test_an_unfinished_run_gets_its_epochs_and_its_status(trained_runs, tmp_path):
    run_dir = shutil.copytree(trained_runs[0], tmp_path / "running")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({"status": "running", "epochs": metrics["epochs"][:1]}))
    entry = run_history(run_dir)
    assert "**Status:** running" in entry
    assert "_No final metrics: the run is running._" in entry
    assert len(tables(entry)[-1]) == 2  # the header and epoch 0
    assert read_run(run_dir).status == "running"


def test_a_folder_that_is_no_run_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["history", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"{tmp_path}: not a run directory" in capsys.readouterr().err
