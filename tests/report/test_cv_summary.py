"""A cross-validated run's summary (cv_summary.py): the interval of the mean, and the table across folds a CV run
ends with (cv.json's own figures; the summary itself: jobs/test_donor_cv.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from geneformer_colon.report.cv_summary import spread


def test_the_interval_of_the_mean_is_students_and_stays_within_the_figures_range():
    values = [0.62, 0.70, 0.75, 0.81]
    half = stats.t.ppf(0.975, 3) * np.std(values, ddof=1) / 2
    assert spread(values)["ci95"] == pytest.approx([np.mean(values) - half, np.mean(values) + half])
    assert spread([0.95, 0.99, 0.90])["ci95"][1] == 1.0 and spread([0.02, 0.10, 0.01])["ci95"][0] == 0.0
    assert spread([2.0, 4.0], bounds=(-np.inf, np.inf))["ci95"][0] < 0  # a figure of another range
    assert spread([0.5])["ci95"] is None and spread([])["n"] == 0


def test_a_cv_run_ends_with_its_table_across_folds(logged_cv_run):
    run_dir, output = logged_cv_run
    tail = output.rstrip().splitlines()[-26:]
    assert any("across folds" in line for line in tail)
    table = [line for line in tail if line.startswith("| ")]
    assert table[0].startswith("| figure | folds | mean | sd")
    cv = json.loads((run_dir / "cv.json").read_text())
    row = next(line for line in table if line.startswith("| test macro F1 |"))
    assert f"| {cv['aggregate']['test']['macro_f1']['mean']:.3f} |" in row
    assert output.rstrip().endswith(table[-1])
