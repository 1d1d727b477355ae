"""Runs read back (reading.py): found at any depth under sweep roots, a run's own folders part of it, a CV run of
one fold read as a run."""

from __future__ import annotations

import json
import math

import pytest
from helpers.paths import REPO_ROOT

from geneformer_colon.common.errors import InputError
from geneformer_colon.runs.reading import Run, find_runs, read_run


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


def test_a_record_written_when_epochs_counted_from_0_reads_back_counted_from_1(tmp_path):
    """metrics.json of a run made before epochs were counted from 1 (the layer-move fixture's, no ``epochs_from``):
    read back as a run written today would be, its epochs and best epoch shifted; today's record as written."""
    old = json.loads((REPO_ROOT / "tests/fixtures/before_layers/left_alone_metrics.json").read_text())
    assert "epochs_from" not in old and [epoch["epoch"] for epoch in old["epochs"]] == [0, 1]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text(json.dumps(old))
    run = read_run(tmp_path / "old")
    assert [epoch["epoch"] for epoch in run.epochs] == [1, 2] and run.metrics["best_epoch"] == old["best_epoch"] + 1
    assert run.epochs[0]["val/macro_f1"] == old["epochs"][0]["val/macro_f1"]
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "metrics.json").write_text(json.dumps(run.metrics))
    assert read_run(tmp_path / "new").metrics == run.metrics
