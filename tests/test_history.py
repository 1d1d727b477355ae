"""`geneformer-colon history`: a run as a training-log entry, history.md, --append, inside a Hydra app."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO_ROOT, compose_train
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from geneformer_colon import cli
from geneformer_colon.report.history import (
    HISTORY_FILE,
    default_config,
    history_entry,
    write_history,
)


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
    entry = history_entry(run_dir)

    assert re.match(rf"## \d{{4}}-\d\d-\d\d \d\d:\d\d · {re.escape(metrics['run_name'])}\n", entry)
    assert "**Started from:** random init" in entry
    assert f"`{metrics['best_checkpoint']}` (epoch {metrics['best_epoch']})" in entry
    highlights, epochs, final = tables(entry)

    # config highlights: against the defaults composed independently here
    defaults = compose_train([])
    rows = {key: (value, default) for key, value, default in highlights[1:]}
    for key, value in (("loss.focal_gamma", "1.5"), ("augment.mixup_prob", "0.3"), ("experiment_name", "colon6"),
                       ("trainer.max_epochs", "2")):
        assert rows[key] == (value, str(OmegaConf.select(defaults, key))), key
    assert not [key for key in rows if key.startswith(("paths.", "run_name", "callbacks.model_checkpoint.dirpath"))]
    assert "data.tokenizer.input_size" not in rows  # follows model.tokenizer.input_size, which is shown
    assert rows["model.tokenizer.input_size"] == ("128", "1024")

    # per-epoch val metrics, best epoch marked
    assert epochs[0][:4] == ["epoch", "acc", "macro F1", "ROC AUC"] and "recall Tumor" in epochs[0]
    assert len(epochs) - 1 == len(metrics["epochs"])
    for row, epoch in zip(epochs[1:], metrics["epochs"]):
        assert row[0] == f"{epoch['epoch']}" + (" (best)" if epoch["epoch"] == metrics["best_epoch"] else "")
        assert row[2] == f"{epoch['val/macro_f1']:.3f}" and row[3] == f"{epoch['val/macro_auroc']:.3f}"

    # final val and test metrics with ROC AUC, per-class precision and recall
    header = final[0]
    assert [row[0] for row in final[1:]] == ["val", "test"]
    for row, split in zip(final[1:], ("val", "test")):
        cells = dict(zip(header, row))
        assert cells["ROC AUC"] == f"{metrics[split]['macro_auroc']:.3f}"
        for name in ("Normal", "Border", "Tumor"):
            assert cells[f"precision {name}"] == f"{metrics[split][f'precision/{name}']:.3f}"
            assert cells[f"recall {name}"] == f"{metrics[split][f'recall/{name}']:.3f}"

    for key, verdict in metrics["success"].items():
        assert f"- {'PASS' if verdict['passed'] else 'FAIL'} `{key}` = {verdict['value']:.3f}" in entry


def test_history_md_and_append_to_a_training_log(trained_runs, tmp_path, capsys):
    run_dir = trained_runs[0]
    assert write_history(run_dir) == run_dir / HISTORY_FILE
    entry = (run_dir / HISTORY_FILE).read_text()
    assert entry == history_entry(run_dir)

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
    entry = history_entry(run_dir)
    assert "**Status:** running" in entry
    assert "_No final metrics: the run is running._" in entry
    assert len(tables(entry)[-1]) == 2  # the header and epoch 0


def test_written_from_inside_a_hydra_app(trained_runs):
    """Training writes its entry while its own Hydra app is initialised; that app must survive."""
    default_config.cache_clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        app = GlobalHydra.instance().hydra
        write_history(trained_runs[0])
        assert GlobalHydra.instance().hydra is app
        assert compose("train", overrides=["experiment=colon6"]).experiment_name == "colon6"
    assert Path(trained_runs[0] / HISTORY_FILE).is_file()


def test_a_folder_that_is_no_run_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["history", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"{tmp_path}: not a run directory" in capsys.readouterr().err
