"""The benchmarks run and print their figures (at a small setting: the figures themselves are in the README)."""

from __future__ import annotations

import re

import pytest
from conftest import run_script


@pytest.mark.slow
def test_the_training_speed_benchmark_prints_each_loops_ratio_to_the_trainer(tmp_path):
    result = run_script("bench/train_speed.py", "--small", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^(HF Trainer.*?|this project, .+?)\s+(\d+\.\d)\s+(\d+\.\d\d)$", result.stdout, re.MULTILINE)
    assert [name for name, _, _ in rows] == [
        "HF Trainer, random order, padded to longest", "this project, none", "this project, class",
        "this project, class_donor", "this project, class_donor, max_tokens=3072"]
    assert all(float(speed) > 0 for _, speed, _ in rows) and rows[0][2] == "1.00"


@pytest.mark.slow
def test_the_tokenizer_benchmark_prints_each_stage(tmp_path):
    result = run_script("bench/tokenize.py", "--cells", "600", "--genes", "800", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("ingest -> canonical .h5ad", "derive vocabulary + exact gene medians", "tokenize V1", "tokenize V2"):
        assert stage in result.stdout


@pytest.mark.slow
def test_the_perturbation_speed_benchmark_prints_both_ways_for_both_shapes():
    result = run_script("bench/perturb_speed.py", "--small")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^  (one at a time|batched \(16 a pass\))\s+(\d+\.\d) perturbations/s\s+(\d+\.\d\d)x$",
                      result.stdout, re.MULTILINE)
    assert [name for name, _, _ in rows] == ["one at a time", "batched (16 a pass)"] * 2
    assert all(float(speed) > 0 for _, speed, _ in rows)
    differences = re.findall(r"largest difference of a probability change between the two: (\S+)", result.stdout)
    assert len(differences) == 2 and all(float(value) < 1e-5 for value in differences)
