"""Sweeps: a grid whose failing job is recorded while the sweep goes on, Optuna studies kept in
sqlite and continued, folder names, and the SLURM launcher's config.

The sweeps run as `train.py -m` subprocesses. The grid sweep starts in the background as soon
as a test needs it and runs while the Optuna invocations run (they overlap on two cores).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import REPO_ROOT, tiny_overrides
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from geneformer_colon.sweep import MAX_DIRNAME_BYTES, job_dirname, short_numbers

GRID = ["optimizer.lr=1e-3,3e-3,1e-2,1e6"]  # 1e6: the loss is NaN by the second step


def sweep_command(tmp_path: Path, shared: dict, sweep_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "train.py", "-m", *tiny_overrides(tmp_path / "outputs", shared), "logger=csv",
            f"hydra.sweep.dir={sweep_dir}", *args]


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])


def run_sweep(tmp_path: Path, shared: dict, sweep_dir: Path, *args: str) -> pd.DataFrame:
    """Run a sweep to its end; its summary.csv."""
    check(subprocess.run(sweep_command(tmp_path, shared, sweep_dir, *args), cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=600, check=False))
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


def test_optuna_study_in_sqlite_survives_failed_trials_and_is_continued(tmp_path, shared_dirs, grid_sweep):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = ["experiment=colon6", "sweep=optuna", f"hydra.sweeper.storage={storage}",
              "hydra.sweeper.study_name=study", "hydra.sweeper.n_trials=3", "trainer.fast_dev_run=true"]
    # First invocation: every trial fails (an unknown test donor); the study records them and goes on.
    first = run_sweep(tmp_path, shared_dirs, tmp_path / "first", *common, "data.test_donors=[KUL99]")
    assert list(first["status"]) == ["failed"] * 3
    assert first["error"].str.contains("KUL99").all()
    # Second invocation, same storage and study name: three more trials in the same study.
    second = run_sweep(tmp_path, shared_dirs, tmp_path / "second", *common)
    assert list(second["status"]) == ["finished"] * 3

    study = optuna.load_study(study_name="study", storage=storage)
    trials = sorted(study.trials, key=lambda trial: trial.number)
    assert [trial.state for trial in trials] == [optuna.trial.TrialState.COMPLETE] * 6
    assert [trial.value for trial in trials[:3]] == [-math.inf] * 3  # failed: ranked last
    # each continued trial's value is its run's val macro F1, and its parameters are the job's overrides (long
    # numbers to 4 significant digits in the summary)
    for trial, row in zip(trials[3:], second.itertuples()):
        assert trial.value == pytest.approx(row.val_macro_f1)
        for name, value in trial.params.items():
            assert short_numbers(f"{name}={value}") in row.overrides.split()
    assert set(trials[3].params) == {"augment.mixup_prob", "loss.focal_gamma", "++loss.class_weights.Border",
                                     "++loss.class_weights.Tumor", "optimizer.lr"}
    assert study.best_value == pytest.approx(second["val_macro_f1"].max())


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


def test_presets_and_the_slurm_launcher_compose():
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        grid = compose("train", overrides=["sweep=mixup_focal"], return_hydra_config=True)
        optuna_cfg = compose("train", overrides=["experiment=colon6", "sweep=optuna"], return_hydra_config=True)
        slurm = compose("train", return_hydra_config=True, overrides=[
            "hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4",
            "hydra.launcher.nodes=2", "hydra.launcher.timeout_min=240"])
    assert grid.hydra.mode.name == "MULTIRUN"
    assert dict(grid.hydra.sweeper.params) == {"augment.mixup_prob": "0,0.15,0.3", "loss.focal_gamma": "0,1.5"}
    sweeper = optuna_cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.study_name == "colon6" and sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.params["optimizer.lr"] == "tag(log, interval(1e-5, 3e-3))"
    assert dict(optuna_cfg.loss.class_weights) == {"Normal": 1.0, "Border": 1.4, "Tumor": 2.2}
    launcher = slurm.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes,
            launcher.timeout_min) == ("gpu", 4, 4, 2, 240)
    assert (slurm.trainer.strategy, slurm.trainer.devices, slurm.trainer.num_nodes) == ("ddp", 4, 2)
