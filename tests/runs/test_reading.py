"""Runs read back (reading.py): found at any depth under sweep roots, a run's own folders part of it, a CV run of
one fold read as a run."""

from __future__ import annotations

import json
import math

import pytest

from geneformer_colon.common.errors import InputError
from geneformer_colon.runs.reading import Run, find_runs


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
