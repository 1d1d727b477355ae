"""Leave-one-donor-out cross-validation (donor_cv.py): folds, their summary, continuing, seeds, SIGTERM between folds,
the baseline cross-validated and compared donor by donor."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from helpers.tiny import compose_train, tiny_overrides
from helpers.wandb_offline import all_offline_runs
from pytorch_lightning.utilities.exceptions import SIGTERMException
from scipy import stats

from geneformer_colon.cli import verbs as cli
from geneformer_colon.common.errors import InputError, Interrupted
from geneformer_colon.jobs import donor_cv
from geneformer_colon.jobs.baseline import run_baseline
from geneformer_colon.jobs.train import train
from geneformer_colon.report.compare import DONOR_PLOT, EPOCH_PLOT, compare_runs

FOLDS = ["cv=lodo", "cv.folds=[KUL01,KUL19]", "logger=csv", "trainer.limit_train_batches=4"]


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def cv_runs(tmp_path_factory, shared_dirs) -> dict:
    """A CV run of two folds made in two goes (the second continues the first), and the CV baseline."""
    out = tmp_path_factory.mktemp("cv")
    common = tiny_overrides(out, shared_dirs) + ["experiment=colon6", *FOLDS]
    first = donor_cv.run(train, compose_train(common + ["cv.folds=[KUL01]"]))
    kul01 = out / "colon6" / "folds" / "KUL01"
    before = (kul01 / "metrics.json").stat().st_mtime_ns
    objective = donor_cv.run(train, compose_train(common + ["resume=true"]))
    baseline = donor_cv.run(run_baseline, compose_train(common, "baseline"))
    return {"dir": out / "colon6", "first": first, "objective": objective, "kul01_untouched":
            (kul01 / "metrics.json").stat().st_mtime_ns == before, "baseline_dir": out / "colon6-naive_bayes",
            "baseline": baseline}


def test_each_fold_is_a_complete_run_and_no_donor_is_in_two_splits(cv_runs):
    run_dir = cv_runs["dir"]
    assert sorted(path.name for path in (run_dir / "folds").iterdir()) == ["KUL01", "KUL19"]
    donors = ["KUL01", "KUL19", "KUL21", "KUL28", "KUL30", "KUL31"]
    for test_donor, val_donor in (("KUL01", "KUL19"), ("KUL19", "KUL21")):  # the next donor validates
        fold = run_dir / "folds" / test_donor
        for name in ("config.yaml", "metrics.json", "checkpoints/best.ckpt", "predictions/test.csv", "history.md"):
            assert (fold / name).is_file(), (test_donor, name)
        metrics = read(fold / "metrics.json")
        assert metrics["donors"]["test"] == [test_donor] and metrics["donors"]["val"] == [val_donor]
        assert sorted(metrics["donors"]["train"]) == sorted(set(donors) - {test_donor, val_donor})
        assert metrics["run_name"] == f"colon6/{test_donor}"


def test_cv_json_holds_the_folds_and_their_aggregate(cv_runs):
    run_dir = cv_runs["dir"]
    summary = read(run_dir / "cv.json")
    assert summary["status"] == "partial" and summary["missing"] == ["KUL21", "KUL28", "KUL30", "KUL31"]
    assert [fold["test_donor"] for fold in summary["folds"]] == ["KUL01", "KUL19"]
    folds = [read(run_dir / "folds" / donor / "metrics.json") for donor in ("KUL01", "KUL19")]
    for row, metrics in zip(summary["folds"], folds):
        for split in ("val", "test"):
            for key in ("accuracy", "macro_f1", "macro_auroc", "recall/Tumor"):
                assert row[split][key] == metrics[split][key], (split, key)
        assert row["best_epoch"] == metrics["best_epoch"] and row["cells"] == metrics["cells"]
    f1 = [metrics["test"]["macro_f1"] for metrics in folds]
    aggregate = summary["aggregate"]["test"]["macro_f1"]
    assert aggregate["mean"] == pytest.approx(np.mean(f1), abs=1e-4)
    assert aggregate["sd"] == pytest.approx(np.std(f1, ddof=1), abs=1e-4)
    assert (aggregate["min"], aggregate["max"]) == (min(f1), max(f1))
    half = stats.t.ppf(0.975, 1) * np.std(f1, ddof=1) / np.sqrt(2)
    # a proportion's interval stays within [0, 1] (two folds: t = 12.7, so it reaches the bounds)
    assert aggregate["ci95"] == pytest.approx([max(np.mean(f1) - half, 0), min(np.mean(f1) + half, 1)], abs=1e-3)
    markdown = (run_dir / "cv.md").read_text()
    assert "| KUL01 | KUL19 |" in markdown and "95% CI of the mean" in markdown and "Not finished: KUL21" in markdown
    assert (run_dir / "plots" / "cv_per_donor.png").is_file()
    history = (run_dir / "history.md").read_text()
    assert "**Leave one donor out:**" in history and "| KUL01 | KUL19 |" in history and "cv.strategy | lodo" in history


def test_the_summary_is_gathered_again_from_the_folds(cv_runs, capsys):
    before = read(cv_runs["dir"] / "cv.json")
    cli.main(["cv", str(cv_runs["dir"])])
    assert "2 of 6 folds" in capsys.readouterr().out
    assert read(cv_runs["dir"] / "cv.json") == before


def test_the_objective_is_the_mean_validation_macro_f1_and_finished_folds_are_skipped(cv_runs):
    run_dir = cv_runs["dir"]
    val = [read(run_dir / "folds" / donor / "metrics.json")["val"]["macro_f1"] for donor in ("KUL01", "KUL19")]
    assert cv_runs["first"] == pytest.approx(val[0])
    assert cv_runs["objective"] == pytest.approx(np.mean(val))
    assert cv_runs["kul01_untouched"]


def test_the_baseline_cross_validates_in_the_same_format_and_compare_pairs_the_donors(cv_runs, tmp_path, capsys):
    baseline = read(cv_runs["baseline_dir"] / "cv.json")
    assert baseline["kind"] == "baseline" and [f["test_donor"] for f in baseline["folds"]] == ["KUL01", "KUL19"]
    assert list(baseline["aggregate"]) == list(read(cv_runs["dir"] / "cv.json")["aggregate"])

    comparison = compare_runs([cv_runs["dir"], cv_runs["baseline_dir"]], tmp_path)
    frame, (pair,) = comparison.frame, comparison.pairs
    assert list(frame["folds"]) == [2, 2] and "test_macro_f1_sd" in frame
    assert pair.donors == ["KUL01", "KUL19"]
    p, sentence = pair.test()
    assert "across 2 donors" in sentence and "no outcome can reach p < 0.05" in sentence
    cli.main(["compare", str(cv_runs["dir"]), str(cv_runs["baseline_dir"]), "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "test macro F1 by donor" in printed and "smallest possible p is 0.500" in printed
    assert "## Paired comparison across donors" in (tmp_path / "comparison.md").read_text()
    # two CV runs: no epoch curves (their folds have them), a line a donor between the runs
    assert (tmp_path / DONOR_PLOT).is_file() and not (tmp_path / EPOCH_PLOT).exists()


def test_fold_plans_and_their_errors():
    donors = ["KUL01", "KUL19", "KUL21"]
    assert [(f.test_donor, f.val_donors) for f in donor_cv.plan_folds(donors, None, None)] == [
        ("KUL01", ("KUL19",)), ("KUL19", ("KUL21",)), ("KUL21", ("KUL01",))]
    assert [(f.test_donor, f.val_donors) for f in donor_cv.plan_folds(donors, None, "KUL19")] == [
        ("KUL01", ("KUL19",)), ("KUL19", ("KUL21",)), ("KUL21", ("KUL19",))]
    assert [f.val_donors for f in donor_cv.plan_folds([*donors, "KUL28"], ["KUL21"], None, 2)] == [
        ("KUL28", "KUL01")]
    with pytest.raises(InputError, match="KUL99"):
        donor_cv.plan_folds(donors, ["KUL99"], None)
    with pytest.raises(InputError, match="at least 3 donors"):
        donor_cv.plan_folds(donors[:2], None, None)
    with pytest.raises(InputError, match="at least 4 donors"):
        donor_cv.plan_folds(donors, None, None, 2)
    with pytest.raises(InputError, match="cv.val_donor=KUL19 and cv.val_donors=2"):
        donor_cv.plan_folds([*donors, "KUL28"], None, "KUL19", 2)


@pytest.mark.slow  # six fold runs: make test-slow, in CI
def test_seeds_repeat_each_fold_and_the_summary_averages_them(tmp_path, shared_dirs, capsys):
    """Two folds x two seeds, two validation donors a fold, checkpoints chosen by the worst of them."""
    overrides = tiny_overrides(tmp_path, shared_dirs) + [  # W&B offline too (logger=default)
        "experiment=colon6", *[o for o in FOLDS if o != "logger=csv"], "trainer.limit_train_batches=2",
        "cv.seeds=[0,1]", "cv.objective=worst",
        "cv.val_donors=2", "callbacks.model_checkpoint.monitor=val/worst_donor_macro_f1"]
    objective = donor_cv.run(train, compose_train(overrides))
    run_dir = tmp_path / "colon6"
    runs = {(donor, seed): read(run_dir / "folds" / donor / f"seed{seed}" / "metrics.json")
            for donor in ("KUL01", "KUL19") for seed in (0, 1)}
    for (donor, seed), metrics in runs.items():
        fold = run_dir / "folds" / donor / f"seed{seed}"
        assert metrics["status"] == "finished" and (fold / "checkpoints/best.ckpt").is_file()
        assert metrics["run_name"] == f"colon6/{donor}/seed{seed}" and len(metrics["donors"]["val"]) == 2
        assert all("val/worst_donor_macro_f1" in epoch for epoch in metrics["epochs"])
        config = (fold / "config.yaml").read_text()
        assert f"test_donor: {donor}" in config and f"seed: {seed}" in config and "val_donor: " in config
    summary = read(run_dir / "cv.json")
    assert summary["seeds"] == [0, 1] and summary["status"] == "partial"
    for row in summary["folds"]:
        own = [runs[(row["test_donor"], seed)] for seed in (0, 1)]
        for split in ("val", "test"):
            for key in ("macro_f1", "accuracy", "recall/Tumor"):
                assert row[split][key] == pytest.approx(np.mean([m[split][key] for m in own]), abs=1e-4)
                assert row["seed_sd"][split][key] == pytest.approx(np.std([m[split][key] for m in own], ddof=1),
                                                                   abs=1e-4)
        assert [seed["test"]["macro_f1"] for seed in row["seeds"]] == [m["test"]["macro_f1"] for m in own]
    means = [row["test"]["macro_f1"] for row in summary["folds"]]
    assert summary["aggregate"]["test"]["macro_f1"]["mean"] == pytest.approx(np.mean(means), abs=1e-4)
    val = [np.mean([runs[(donor, seed)]["val"]["macro_f1"] for seed in (0, 1)]) for donor in ("KUL01", "KUL19")]
    assert objective == pytest.approx(min(val))
    assert "test macro F1 seed sd" in (run_dir / "cv.md").read_text()

    # W&B, read back: one cv run with the seed-averaged figures of each donor and their seed sd; a fold run
    # a donor and seed, in the folds' group, its donor and seed in its config
    wandb_runs = all_offline_runs(run_dir)
    (cv_run,) = [run for run in wandb_runs if run.job_type == "cv"]
    folds = sorted((run for run in wandb_runs if run.job_type == "fold"), key=lambda run: run.name)
    assert len(wandb_runs) == 5 and {run.exit_code for run in wandb_runs} == {0}
    assert [run.name for run in folds] == [f"colon6/{donor}/seed{seed}" for donor, seed in runs]
    assert [(run.config["cv.test_donor"], run.config["cv.seed"], run.config["seed"]) for run in folds] == [
        (donor, seed, seed) for donor, seed in runs]
    assert {run.group for run in folds} == {"colon6 folds"}
    for run, metrics in zip(folds, runs.values()):
        assert run.summary["test/macro_f1"] == pytest.approx(metrics["test"]["macro_f1"], abs=1e-4)
    assert cv_run.config["cv.seeds"] == [0, 1] and cv_run.summary["seeds"] == 2
    assert cv_run.summary["test/macro_f1"] == pytest.approx(summary["aggregate"]["test"]["macro_f1"]["mean"],
                                                            abs=1e-4)
    for row in summary["folds"]:
        donor = row["test_donor"]
        assert cv_run.summary[f"test/macro_f1/{donor}"] == pytest.approx(row["test"]["macro_f1"], abs=1e-4)
        assert cv_run.summary[f"test/macro_f1/{donor}/seed_sd"] == pytest.approx(
            row["seed_sd"]["test"]["macro_f1"], abs=1e-4)

    # compare pairs two seeded CV runs by donor and weighs the difference against seed noise
    other = tmp_path / "colon6-other"
    other.mkdir()
    edited = dict(summary, folds=[dict(row, test=dict(row["test"], macro_f1=row["test"]["macro_f1"] + 0.01 * (i + 1)))
                                  for i, row in enumerate(summary["folds"])])
    (other / "cv.json").write_text(json.dumps(edited))
    (other / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (pair,) = compare_runs([run_dir, other], tmp_path / "compare").pairs
    assert pair.seed_errors is not None and "Seed noise:" in pair.test()[1]


def test_sigterm_between_folds_ends_the_job_after_the_fold_with_its_history(tiny_cfg, tmp_path):
    common = ["cv=lodo", "run_name=cv", "cv.folds=[KUL01,KUL19]"]

    def fold_then_sigterm(fold_cfg):
        record = run_baseline(fold_cfg)
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, while the job goes from one fold to the next
        return record

    with pytest.raises(Interrupted) as paused:
        donor_cv.run(fold_then_sigterm, tiny_cfg(*common, config_name="baseline"))
    assert paused.value.exit_code == 128 + signal.SIGTERM and "resume=true" in str(paused.value)
    folds = tmp_path / "outputs" / "cv" / "folds"
    assert [path.name for path in folds.iterdir()] == ["KUL01"] and (folds / "KUL01" / "history.md").is_file()
    (folds / "KUL01" / "history.md").unlink()  # as a job killed between a fold's metrics and its history left it
    donor_cv.run(run_baseline, tiny_cfg(*common, "resume=true", config_name="baseline"))
    assert all((folds / donor / "history.md").is_file() for donor in ("KUL01", "KUL19"))

    def evaluation_stopped(cfg):  # Lightning's answer to SIGTERM while it evaluates: a silent exit 0
        raise SIGTERMException

    with pytest.raises(Interrupted, match="SIGTERM"):
        donor_cv.run(evaluation_stopped, tiny_cfg())
