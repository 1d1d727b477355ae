"""The benchmarks run and print their figures (at a small setting: the figures themselves are in the README)."""

from __future__ import annotations

import json
import re

import pytest
from helpers.processes import run_script
from helpers.tiny import TINY_ENCODER


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
def test_the_perturbation_speed_benchmark_prints_each_way_for_both_shapes_and_the_shards():
    result = run_script("bench/perturb_speed.py", "--small", "--shards", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^  (one at a time|plain batched forward \(16 a pass\)|batched \(16 a pass\))\s+(\d+\.\d) "
                      r"perturbations/s\s+(\d+\.\d\d)x\s+(\d+\.\d\d)x plain$", result.stdout, re.MULTILINE)
    assert [name for name, *_ in rows] == ["one at a time", "plain batched forward (16 a pass)",
                                           "batched (16 a pass)"] * 2
    assert all(float(speed) > 0 for _, speed, _, _ in rows) and rows[1][3] == "1.00"
    differences = re.findall(r"largest difference of a probability change between the three: (\S+)", result.stdout)
    assert len(differences) == 2 and all(float(value) < 1e-5 for value in differences)
    assert len(re.findall(r"^  2 shards in 2 processes: compute .* \((\d+\.\d\d)x\)", result.stdout, re.MULTILINE)) == 2


@pytest.mark.slow
def test_the_donor_shift_study_tables_its_recipes_and_goes_on_where_it_stopped(tmp_path, shared_dirs):
    out = tmp_path / "study"
    arguments = ["--out", str(out), "--seeds", "0", "1", "--folds", "KUL01", "KUL19", "--recipes", "group_dro",
                 "--settings", "shift1", "--cells", "480", "--epochs", "1", "--",
                 f"paths.data_dir={shared_dirs['data']}", f"paths.cache_dir={shared_dirs['cache']}",
                 "data.source.n_genes=300", "model.tokenizer.input_size=128", *TINY_ENCODER]
    result = run_script("bench/donor_shift_study.py", *arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (out / "study.md").read_text()
    rows = [line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith("| shift1 |")]
    assert [row[1] for row in rows] == ["colon6", "group_dro"]
    folds = sorted(out.glob("shift1/*/folds/*/seed*/metrics.json"))
    assert len(folds) == 8  # two recipes x two test donors x two seeds
    for row in rows:  # KUL19's figure is the mean of its seeds' own test macro F1
        donor = out / "shift1" / row[1] / "folds" / "KUL19"
        seeds = [json.loads((donor / f"seed{seed}" / "metrics.json").read_text()) for seed in (0, 1)]
        assert float(row[4]) == pytest.approx(sum(m["test"]["macro_f1"] for m in seeds) / 2, abs=2e-3)
        config = (donor / "seed0" / "config.yaml").read_text()
        assert "hidden_size: 32" in config and ("step_size: 0.1" in config) == (row[1] == "group_dro")

    # run again: every fold is kept as it was, and the table is the same but for the wall times
    written = {path: path.stat().st_mtime_ns for path in folds}
    again = run_script("bench/donor_shift_study.py", *arguments)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {path: path.stat().st_mtime_ns for path in folds} == written
    assert [line.strip("| ").split(" | ")[:7] for line in (out / "study.md").read_text().splitlines()
            if line.startswith("| shift1 |")] == [row[:7] for row in rows]


@pytest.mark.slow
def test_the_donor_adaptation_study_tables_kul01_beside_the_shift_studys_columns(tmp_path, shared_dirs):
    out = tmp_path / "study"
    result = run_script("bench/donor_adaptation_study.py", "--out", str(out), "--seeds", "0", "--folds", "KUL01",
                        "KUL19", "--recipes", "tent", "--settings", "technical", "--cells", "480", "--epochs", "1",
                        "--",
                        f"paths.data_dir={shared_dirs['data']}", f"paths.cache_dir={shared_dirs['cache']}",
                        "data.source.n_genes=300", "model.tokenizer.input_size=128", *TINY_ENCODER)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (out / "adaptation-study.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| setting |")).strip("| ").split(" | ")
    rows = [line.strip("| ").split(" | ") for line in lines if line.startswith("| technical |")]
    assert [row[1] for row in rows] == ["colon6", "tent"] and header[6] == "KUL01 macro F1"
    for row in rows:
        kul01 = json.loads((out / "technical" / row[1] / "folds" / "KUL01" / "metrics.json").read_text())
        assert float(row[6]) == pytest.approx(kul01["test"]["macro_f1"], abs=2e-3)
    assert (out / "technical/tent/folds/KUL01/adaptation.json").is_file()


@pytest.mark.slow
def test_the_model_scale_benchmark_prints_every_case():
    result = run_script("bench/model_scale.py", "--small")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = re.findall(r"^\| training step, ([24])-D mask, checkpointing (on|off) \| (V1-10M|V2-104M) .*\| (\d+\.\d\d) "
                       r"s/step \|", result.stdout, re.MULTILINE)
    assert len(steps) == 8 and len(set(steps)) == 8
    for verb in ("predict (forward, inference mode)", "explain (integrated gradients, 2 steps)"):
        assert re.search(rf"^\| {re.escape(verb)} \| V2-104M .*\| \d+\.\d+ cells/s \|", result.stdout, re.MULTILINE)
    sizes = re.findall(r"best.ckpt with AdamW state -> weights only \| .*\| (\d+\.\d) -> (\d+\.\d) MiB", result.stdout)
    assert len(sizes) == 2 and all(float(after) < float(before) / 2 for before, after in sizes)


@pytest.mark.slow
def test_the_gpu_check_runs_in_its_smoke_setting_on_the_cpu():
    result = run_script("bench/gpu_check.py", "--smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    trained = re.findall(r"^train V2-104M, max_tokens (\d+) .*checkpointing (on|off): (\d+\.\d) cells/s, peak - GiB$",
                         result.stdout, re.MULTILINE)
    assert len(trained) == 4 and all(float(speed) > 0 for *_, speed in trained)
    for verb, unit in (("predict", "cells/s"), ("perturb", "perturbations/s"), ("explain", "cells/s")):
        assert re.search(rf"^{verb} \(.*\): \d+\.\d+ {unit}, peak - GiB$", result.stdout, re.MULTILINE), verb
