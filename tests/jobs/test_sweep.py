"""Sweeps (sweep.py): a grid whose failing job is recorded while the sweep goes on, a grid of CV jobs summarised by
their means, Optuna studies kept in sqlite and continued, folder names (the pruner: test_study.py; the presets and
the SLURM launcher's config: tests/test_configs.py).

The sweeps run as `train.py -m` subprocesses. The grid sweep starts in the background as soon
as a test needs it and runs while the Optuna invocations run (they overlap on two cores).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from helpers.paths import REPO_ROOT
from helpers.processes import run_script
from helpers.tiny import tiny_overrides
from helpers.wandb_offline import all_offline_runs
from omegaconf import OmegaConf

from geneformer_colon.jobs.sweep import MAX_DIRNAME_BYTES, STUDY_BEST, job_dirname, short_numbers

GRID = ["optimizer.lr=1e-3,3e-3,1e-2,1e6"]  # 1e6: the loss is NaN by the second step
# Two folds of leave-one-donor-out, short epochs.
CV_FOLDS = ["cv=lodo", "cv.folds=[KUL01,KUL19]", "logger=csv", "trainer.limit_train_batches=4"]


def sweep_command(tmp_path: Path, shared: dict, sweep_dir: Path, *args: str, logger: str = "csv") -> list[str]:
    return [sys.executable, "train.py", "-m", *tiny_overrides(tmp_path / "outputs", shared), f"logger={logger}",
            f"hydra.sweep.dir={sweep_dir}", *args]


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])


def run_sweep(tmp_path: Path, shared: dict, sweep_dir: Path, *args: str, logger: str = "csv") -> pd.DataFrame:
    """Run a sweep to its end; its summary.csv."""
    check(subprocess.run(sweep_command(tmp_path, shared, sweep_dir, *args, logger=logger), cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=600, check=False))
    return pd.read_csv(sweep_dir / "summary.csv")


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, shared_dirs):
    """The 4-job grid, started in the background; call the fixture's value to wait for it."""
    tmp_path = tmp_path_factory.mktemp("grid")
    sweep_dir = tmp_path / "sweep"
    log = tmp_path / "sweep.log"  # a file, not a pipe: a full pipe would stall the sweep until waited for
    with open(log, "w") as output:
        process = subprocess.Popen(
            sweep_command(tmp_path, shared_dirs, sweep_dir, *GRID, "trainer.limit_train_batches=2"),
            cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT, text=True,
        )

    def finished() -> tuple[Path, Path]:
        assert process.wait(timeout=600) == 0, log.read_text()[-4000:]
        return sweep_dir, tmp_path / "outputs"

    yield finished
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.mark.slow  # many processes: run by make test-slow (CI too)
def test_an_optuna_study_run_twice_is_one_study_and_one_wandb_group(tmp_path, shared_dirs, grid_sweep):
    assert int(optuna.__version__.split(".")[0]) >= 4
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = ["experiment=colon6", "sweep=optuna", f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=study",
              "hydra.sweeper.n_trials=3", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
              "trainer.limit_test_batches=1"]
    first = run_sweep(tmp_path, shared_dirs, tmp_path / "first", *common, logger="default")
    assert list(first["job"]) == [0, 1, 2] and list(first["status"]) == ["finished"] * 3
    # Second invocation, same storage and study name: three more trials in the same study, which fail
    # here (an unknown test donor): failed trials, and the study goes on.
    second = run_sweep(tmp_path, shared_dirs, tmp_path / "second", *common, "data.test_donors=[KUL99]",
                       logger="default")

    study = optuna.load_study(study_name="study", storage=storage)
    trials = sorted(study.trials, key=lambda trial: trial.number)
    assert [trial.state for trial in trials] == [optuna.trial.TrialState.COMPLETE] * 3 + \
        [optuna.trial.TrialState.FAIL] * 3
    for trial, row in zip(trials, first.itertuples()):  # each trial's value is its run's val macro F1
        assert trial.value == pytest.approx(row.val_macro_f1)
        assert trial.user_attrs["run_dir"] == row.run_dir
        for name, value in trial.params.items():
            assert short_numbers(f"{name}={value}") in row.overrides.split()
    assert set(trials[0].params) == {"augment.mixup_prob", "loss.focal_gamma", "++loss.class_weights.Border",
                                     "++loss.class_weights.Tumor", "optimizer.lr"}

    # the second invocation's summary names the study's best trial, run by the first
    jobs, best = second[second["note"].isna()], study.best_trial
    assert list(jobs["job"]) == [3, 4, 5] and list(jobs["status"]) == ["failed"] * 3
    assert jobs["error"].str.contains("KUL99").all()
    (best_row,) = second[second["note"] == STUDY_BEST].itertuples()
    assert (best_row.job, best_row.run_dir) == (best.number, trials[best.number].user_attrs["run_dir"])
    assert best_row.val_macro_f1 == pytest.approx(best.value)
    markdown = (tmp_path / "second" / "summary.md").read_text()
    assert "3 jobs: 0 finished, 3 failed" in markdown
    assert "Optuna study study: 6 trials (3 complete, 3 fail)" in markdown
    assert f"best val macro F1: trial {best.number} ({best.value:.3f})" in markdown

    # W&B: one group, optuna/<study> (no run's name); a run a trial (the failed ones too), trial number and study
    # in its config
    runs = all_offline_runs(tmp_path / "first") + all_offline_runs(tmp_path / "second")
    assert {run.group for run in runs} == {"optuna/study"}
    # each invocation's own run (job type sweep) holds its summary.csv: the second's names the study's best
    invocations = [run for run in runs if run.job_type == "sweep"]
    assert [run.directory.parents[1].name for run in invocations] == ["first", "second"]
    for run in invocations:
        kept = (run.directory / "files" / "summary.csv").read_text()
        assert kept == (run.directory.parents[1] / "summary.csv").read_text()
        assert (run.directory / "files" / "study.json").is_file()
    assert STUDY_BEST in (invocations[1].directory / "files" / "summary.csv").read_text()
    assert invocations[1].summary["best/job"] == best.number and invocations[1].summary["jobs/failed"] == 3
    runs = [run for run in runs if run.job_type != "sweep"]
    assert sorted(run.config["sweep.trial"] for run in runs) == [0, 1, 2, 3, 4, 5]
    assert {run.config["sweep.study"] for run in runs} == {"study"}
    assert [run.exit_code for run in sorted(runs, key=lambda run: run.config["sweep.trial"])] == [0] * 3 + [1] * 3
    for run in runs:  # short names: the swept values to 3 significant digits
        number = run.config["sweep.trial"]
        assert run.name.startswith(f"colon6 trial {number}: mixup_prob=") and len(run.name) < 110, run.name
        for value in re.findall(r"=(\S+)", run.name):
            assert len(re.sub(r"e[-+]\d+$|^0\.0*|\.|-", "", value)) <= 3, run.name


@pytest.mark.slow  # a sweep of four job processes: make test-slow, in CI
def test_grid_sweep_records_the_failed_job_and_goes_on(grid_sweep):
    sweep_dir, output_dir = grid_sweep()
    job_dirs = sorted(path for path in sweep_dir.iterdir() if path.is_dir() and not path.name.startswith("."))
    assert [path.name.split("_")[0] for path in job_dirs] == ["0", "1", "2", "3"]
    assert not (output_dir / "default").exists()  # every run went to its job's folder, none to outputs/

    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary["job"]) == [0, 1, 2, 3]
    assert list(summary["status"]) == ["finished", "finished", "finished", "failed"]
    assert list(summary["overrides"]) == [f"optimizer.lr={lr}" for lr in ("0.001", "0.003", "0.01", "1000000.0")]
    failed = summary.iloc[3]
    assert failed["error"].startswith("FloatingPointError: train/loss is nan")
    assert json.loads((Path(failed["run_dir"]) / "metrics.json").read_text())["status"] == "failed"
    for row in summary.iloc[:3].itertuples():
        run_dir = Path(row.run_dir)
        assert run_dir.parent == sweep_dir and run_dir in job_dirs
        assert OmegaConf.load(run_dir / "config.yaml").paths.run_dir == str(run_dir)
        assert (run_dir / "checkpoints" / "best.ckpt").is_file()
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert row.best_epoch == metrics["best_epoch"]
        for split in ("val", "test"):
            for name in ("accuracy", "macro_f1", "macro_auroc"):
                assert getattr(row, f"{split}_{name}") == pytest.approx(metrics[split][name])
    markdown = (sweep_dir / "summary.md").read_text()
    assert "4 jobs: 3 finished, 1 failed, 0 running" in markdown
    assert markdown.count("\n| ") == 5  # header and one row a job


def test_job_folder_names_stay_short_and_distinct():
    overrides = ",".join(f"model.encoder.key_{i}=0.{i:0>17}" for i in range(12))
    names = [job_dirname(num, overrides) for num in (0, 1)]
    assert all(len(name.encode()) <= MAX_DIRNAME_BYTES for name in names)
    assert names[0] != names[1] and names[0].startswith("0_model.encoder.key_0=")
    assert job_dirname(2, "init_from=outputs/colon3,seed=1") == "2_init_from=outputs_colon3,seed=1"
    assert job_dirname(3, "") == "3"


@pytest.mark.slow  # a sweep of several jobs: make test-slow, in CI
def test_a_grid_sweep_of_cv_jobs_summarises_their_means(tmp_path, shared_dirs):
    sweep_dir = tmp_path / "sweep"
    result = run_script("train.py", "-m", *tiny_overrides(tmp_path / "outputs", shared_dirs), *CV_FOLDS,
                        "trainer.max_epochs=1", "loss.focal_gamma=0,1.5", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary["status"]) == ["finished", "finished"] and list(summary["folds"]) == [2, 2]
    for row in summary.itertuples():
        cv_json = json.loads((Path(row.run_dir) / "cv.json").read_text())
        assert row.val_macro_f1 == pytest.approx(cv_json["aggregate"]["val"]["macro_f1"]["mean"])
        assert row.test_macro_f1_sd == pytest.approx(cv_json["aggregate"]["test"]["macro_f1"]["sd"])
    assert "test macro F1 sd" in (sweep_dir / "summary.md").read_text()
    for job in (0, 1):  # each job's row of the summary in its output, as it ends
        assert f"job {job} in {sweep_dir / 'summary.md'}:\n| job | overrides | status |" in result.stdout
