"""`geneformer-colon compare` (compare.py): two runs, a sweep root with unfinished jobs, the files it writes, and the
paired test of two CV runs across donors."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from helpers.runs import JOBS, SWEEP, metrics_of
from rich.console import Console
from scipy import stats

from geneformer_colon.cli import verbs as cli
from geneformer_colon.report.compare import (
    EPOCH_PLOT,
    OWN_SETTINGS,
    RECALL_PLOT,
    TABLE_FILE,
    WIDTH,
    PairedComparison,
    compare_runs,
    comparison_frame,
    per_cell_type,
    plot_epochs,
    print_comparison,
)
from geneformer_colon.report.run_tables import METRIC_COLUMNS, TRUST_COLUMNS
from geneformer_colon.runs.config import flatten
from geneformer_colon.runs.reading import Run, read_run


def assert_png(path: Path) -> None:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100, path
    assert np.ptp(image[..., :3]) > 0, f"{path} is blank"


def test_two_runs_side_by_side_with_the_config_that_differs(trained_runs, tmp_path):
    out = tmp_path / "comparison"
    comparison = compare_runs(trained_runs, out)
    frame, pairs = comparison.frame, comparison.pairs
    assert pairs == []  # one test donor each: nothing to pair
    assert sorted(frame["run"]) == sorted(JOBS)
    assert frame["val_macro_f1"].is_monotonic_decreasing
    for row in frame.to_dict("records"):
        metrics = metrics_of(trained_runs[list(JOBS).index(row["run"])])
        assert row["status"] == "finished"
        assert row["best_epoch"] == metrics["best_epoch"]
        for split in ("val", "test"):
            for metric in ("accuracy", "macro_f1", "macro_auroc"):
                assert row[f"{split}_{metric}"] == pytest.approx(metrics[split][metric])
        for metric in ("ece", "classwise_ece", "brier", "nll", "aurc"):  # lower is better: calibration, abstention
            assert row[f"test_{metric}"] == pytest.approx(metrics["test"][metric])
    # run_dir, run_name and the other paths differ too, but are not how the runs were made
    config_columns = [column for column in frame.columns if column not in ("run", "status", "best_epoch",
                                                                          *METRIC_COLUMNS, *TRUST_COLUMNS)]
    assert sorted(config_columns) == ["augment.mixup_prob", "loss.focal_gamma"]
    by_run = frame.set_index("run")
    assert by_run.loc["0_loss.focal_gamma=0", "loss.focal_gamma"] == "0"
    assert by_run.loc["1_augment.mixup_prob=0.3,loss.focal_gamma=1.5", "augment.mixup_prob"] == "0.3"

    sections = (out / TABLE_FILE).read_text().split("\n## ")
    table = [line for line in sections[1].splitlines() if line.startswith("|")]  # the runs' table
    assert len(table) == 2 + len(JOBS)
    assert "test ECE" in (out / TABLE_FILE).read_text()  # a continuation of the runs' table
    assert "val macro F1" in table[0] and "loss.focal_gamma" in "".join(sections[1:3])  # or its continuation
    assert table[2].startswith(f"| #1 | {frame['run'][0]} | finished |")
    assert f"{frame['val_macro_f1'][0]:.3f}" in table[2]
    assert_png(out / EPOCH_PLOT)
    assert_png(out / RECALL_PLOT)

    # the test donor's cell types, each run's figure from its own metrics.json
    text = (out / TABLE_FILE).read_text()
    assert "## Test macro F1 by cell type" in text
    for run, run_dir in zip(comparison.runs, (trained_runs[list(JOBS).index(label)] for label in frame["run"])):
        by_cell_type = metrics_of(run_dir)["test"]["by_cell_type"]
        assert len(by_cell_type) > 1
        assert per_cell_type(run) == {name: values["macro_f1"] for name, values in by_cell_type.items()}


def rewrite_metrics(run_dir: Path, **changes) -> None:
    metrics = {**metrics_of(run_dir), **changes}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_a_node_only_one_run_sets_is_counted_not_given_a_column_a_key(trained_runs):
    """A network beside a baseline: the network's dozens of trainer/optimizer keys the baseline lacks are counted in
    one cell; a key two runs set, or a node one run sets a few keys of, keeps its columns."""
    network = read_run(trained_runs[0])
    config = {key: value for key, value in network.config.items() if key not in ("trainer", "optimizer")}
    baselines = [dataclasses.replace(network, config={**config, "baseline": {"name": name, **extra}})
                 for name, extra in (("logreg", {"C": 1.0}), ("scanvi", {"n_latent": 10}))]
    frame = comparison_frame([network, *baselines], ["network", "logreg", "scanvi"]).set_index("run")
    trainer_keys = len([key for key in flatten(network.config) if key.startswith("trainer.")])
    assert trainer_keys > 3 and not any(column.startswith(("trainer.", "optimizer.")) for column in frame.columns)
    assert f"trainer.* ({trainer_keys})" in frame.loc["network", OWN_SETTINGS]
    assert frame.loc["logreg", OWN_SETTINGS] == frame.loc["scanvi", OWN_SETTINGS] == "-"
    assert frame.loc["logreg", "baseline.C"] == "1.0" and frame.loc["scanvi", "baseline.name"] == "scanvi"
    assert frame.loc["network", "baseline.name"] == "-"


def test_sweep_root_lists_runs_at_any_depth_and_unfinished_ones_by_status(trained_runs, tmp_path):
    root = tmp_path / "multirun"
    shutil.copytree(trained_runs[0].parents[2], root)
    sweep = tmp_path / SWEEP
    first = sweep / next(iter(JOBS))
    best = shutil.copytree(first, sweep / "2_best")
    rewrite_metrics(best, val={**metrics_of(first)["val"], "macro_f1": 0.99})
    failed = shutil.copytree(first, sweep / "3_loss.focal_gamma=9")
    (failed / "metrics.json").write_text(json.dumps({"status": "failed", "error": "NaN loss",
                                                     "epochs": metrics_of(first)["epochs"][:1]}))
    (sweep / "4_augment.mixup_prob=0.9" / ".hydra").mkdir(parents=True)  # died before writing anything
    shutil.copy(first / "config.yaml", sweep / "4_augment.mixup_prob=0.9" / ".hydra" / "config.yaml")
    (first / "eval" / "test-KUL21").mkdir(parents=True)  # what eval.py writes: not another run
    shutil.copy(first / "metrics.json", first / "eval" / "test-KUL21" / "metrics.json")

    frame = compare_runs([root]).frame
    assert frame["run"][0] == "2_best"
    assert sorted(frame["run"][1:3]) == sorted(JOBS)
    assert list(frame["run"][3:]) == ["3_loss.focal_gamma=9", "4_augment.mixup_prob=0.9"]
    assert list(frame["status"]) == ["finished"] * 3 + ["failed", "no metrics.json"]
    assert frame["val_macro_f1"][0] == pytest.approx(0.99)
    assert frame[["val_macro_f1", "test_macro_f1"]][3:].isna().all().all()
    out = sweep / "comparison_multirun"  # by default next to the runs, named after what is compared
    assert (out / TABLE_FILE).is_file()
    assert "| 4_augment.mixup_prob=0.9 | no metrics.json |" in (out / TABLE_FILE).read_text()
    assert_png(out / EPOCH_PLOT)


def test_cli_prints_the_table(trained_runs, tmp_path, capsys):
    cli.main(["compare", *map(str, trained_runs), "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for job in JOBS:
        assert job in printed
    assert "val macro F1" in printed and "loss.focal_gamma" in printed
    assert (tmp_path / TABLE_FILE).is_file()


def test_comparing_other_runs_under_the_same_parent_keeps_the_earlier_comparison(trained_runs, tmp_path):
    parent = tmp_path / "outputs"
    first, second = (shutil.copytree(run, parent / name) for run, name in zip(trained_runs, ("colon6", "colon7")))
    third = shutil.copytree(trained_runs[0], parent / "colon8")
    outs = [compare_runs(pair).out for pair in ([first, second], [first, third], [first, second])]
    assert outs == [parent / "comparison_colon6_vs_colon7", parent / "comparison_colon6_vs_colon8",
                    parent / "comparison_colon6_vs_colon7-2"]
    texts = [(out / TABLE_FILE).read_text() for out in outs]
    assert "colon7" in texts[0] and "colon8" not in texts[0] and "colon8" in texts[1]
    assert texts[2] == texts[0]


def test_tables_fit_100_columns_with_the_run_labels_intact(trained_runs, tmp_path):
    long_job = "3_" + ",".join(f"model.encoder.setting_{i}=0.{i:0>10}" for i in range(4)) + ",loss.focal_gamma=0"
    runs = [shutil.copytree(run, tmp_path / "sweep" / name) for run, name in zip(trained_runs, (
        long_job, long_job.replace("3_", "4_").replace("focal_gamma=0", "focal_gamma=1.5")))]
    comparison = compare_runs(runs, tmp_path / "out")
    labels = list(comparison.frame["run"])
    assert labels == ["3_loss.focal_gamma=0", "4_loss.focal_gamma=1.5"] or \
        labels == ["4_loss.focal_gamma=1.5", "3_loss.focal_gamma=0"]  # the overrides all jobs share left out
    printed = io.StringIO()
    print_comparison(comparison, Console(file=printed, width=WIDTH, force_terminal=True, color_system=None))
    lines = printed.getvalue().splitlines()
    assert max(map(len, lines)) <= WIDTH
    for label in labels:
        assert any(f" {label} " in line for line in lines), label
    for table in comparison.tables:
        assert table.width() <= WIDTH, table.title
    markdown = (tmp_path / "out" / TABLE_FILE).read_text()
    assert max(len(line) for line in markdown.splitlines() if line.startswith("|")) <= WIDTH
    assert all(f"| {label} |" in markdown for label in labels)


def test_a_folder_without_runs_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"{tmp_path}: holds no run directory" in capsys.readouterr().err


def test_a_pretraining_run_beside_a_training_run_draws_only_the_training_curve(tmp_path):
    """A masked-gene run's epochs hold no val macro F1 (make notebook over outputs/ after pretrain.py)."""
    pretraining = Run(tmp_path / "pretrain", {"status": "finished", "epochs": [{"epoch": 0, "val/masked_loss": 5.1}]},
                      {}, {})
    training = Run(tmp_path / "colon6", {"status": "finished", "epochs": [{"epoch": 0, "val/macro_f1": 0.4},
                                                                         {"epoch": 1, "val/macro_f1": 0.5}]}, {}, {})
    assert not plot_epochs([pretraining], ["pretrain"], tmp_path / "none.png")
    assert plot_epochs([pretraining, training], ["pretrain", "colon6"], tmp_path / "epochs.png")
    assert (tmp_path / "epochs.png").is_file()


def test_a_paired_test_with_enough_donors_gives_a_p_value():
    donors = [f"D{i}" for i in range(8)]
    pair = PairedComparison("a", "b", donors, [0.5] * 8, [0.6, 0.7, 0.55, 0.62, 0.58, 0.65, 0.61, 0.59])
    p, sentence = pair.test()
    assert p == pytest.approx(stats.wilcoxon(pair.differences).pvalue) and p < 0.05
    assert "no outcome" not in sentence
