"""One process at a time holds a run directory (lock.py): two train.py processes on one run name, one runs and the
refused one changes no byte; CV jobs of one run hold their own folds. The processes are real."""

from __future__ import annotations

import json
import os
import time

import pytest
from helpers.processes import one_error_line, pause_at, run_script
from helpers.runs import fingerprints
from helpers.tiny import compose_train, tiny_overrides

from geneformer_colon.jobs import donor_cv
from geneformer_colon.jobs.baseline import run_baseline
from geneformer_colon.jobs.train import train
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.lock import RunDirBusy, holding, removed_if_left_empty


@pytest.mark.slow
def test_two_train_processes_on_one_run_name_one_runs_and_a_refused_start_changes_no_byte(tmp_path, shared_dirs):
    common = tiny_overrides(tmp_path / "outputs", shared_dirs) + ["logger=csv", "trainer.limit_train_batches=3"]
    alone = train(compose_train(common + ["run_name=alone"]))
    # both stand still after their second step (the one holding the directory, until told to go on)
    marker = tmp_path / "paused.marker"
    pause = pause_at(marker, epoch=0, batch=1)
    logs = [open(tmp_path / f"twin{number}.log", "w+") for number in range(2)]
    twins = [run_script("train.py", *common, "run_name=twin", *pause, wait=False, stdout=log, stderr=log)
             for log in logs]
    deadline = time.monotonic() + 300
    while all(twin.poll() is None for twin in twins):
        assert time.monotonic() < deadline, "neither process ended"
        time.sleep(0.1)
    loser = next(number for number, twin in enumerate(twins) if twin.poll() is not None)
    winner = twins[1 - loser]
    assert twins[loser].returncode == 2 and winner.poll() is None  # refused while the other runs
    logs[loser].seek(0)
    refusal = one_error_line(logs[loser].read())
    assert f"outputs/twin: in use by pid {winner.pid} on " in refusal and ", started 20" in refusal
    marker.with_name(marker.name + ".sent").touch()
    assert winner.wait(timeout=300) == 0, (tmp_path / f"twin{1 - loser}.log").read_text()[-3000:]

    run_dir = tmp_path / "outputs" / "twin"
    finished = json.loads((run_dir / "metrics.json").read_text())
    for key in ("epochs", "best_epoch", "val", "test"):
        assert finished[key] == alone[key], key
    files = set(fingerprints(run_dir))
    assert files - set(fingerprints(tmp_path / "outputs" / "alone")) == {".hydra/config.yaml", ".hydra/hydra.yaml",
                                                                        ".hydra/overrides.yaml", "train.log"}
    assert len(list((run_dir / "csv").iterdir())) == 1  # one CSV log, one run

    # a refused start and a refused resume leave every byte of the finished run as it was, .hydra/ included
    before = fingerprints(run_dir)
    for refused, expected in ((["optimizer.lr=0.5"], "already holds a run"),
                              (["optimizer.lr=0.5", "resume=true"], "another recipe than the run's")):
        result = run_script("train.py", *common, "run_name=twin", *refused)
        assert result.returncode == 2 and expected in one_error_line(result.stderr), result.stderr[-2000:]
        assert fingerprints(run_dir) == before


def test_cv_jobs_of_one_run_hold_their_own_folds(tiny_cfg, tmp_path):
    """A second job on the same folds, or a run of one split on the CV run's directory: refused at once; a job
    on other folds runs beside (nested here in the first job's fold, which holds its locks meanwhile)."""
    common = ["cv=lodo", "run_name=cv"]
    seen = {}

    def first_fold(fold_cfg):
        for name, overrides in (("same fold", ["cv.folds=[KUL01]"]), ("one split", ["cv=none"])):
            with pytest.raises(RunDirBusy, match=rf"in use by pid {os.getpid()} on "):
                donor_cv.run(run_baseline, tiny_cfg(*common, *overrides, config_name="baseline"))
            seen[name] = "refused"
        seen["other folds"] = donor_cv.run(run_baseline, tiny_cfg(*common, "cv.folds=[KUL19]", config_name="baseline"))
        return run_baseline(fold_cfg)

    donor_cv.run(first_fold, tiny_cfg(*common, "cv.folds=[KUL01]", config_name="baseline"))
    assert seen["same fold"] == seen["one split"] == "refused" and seen["other folds"] > 0
    cv = json.loads((tmp_path / "outputs" / "cv" / "cv.json").read_text())
    assert sorted(fold["test_donor"] for fold in cv["folds"]) == ["KUL01", "KUL19"]


def test_a_refused_start_leaves_the_holders_empty_directory_in_place(tmp_path):
    """The holder's directory may still be empty when a second start is refused (Hydra made it, nothing is written
    yet); the refused start must not remove it from under the holder (the CI failure of the twin-process test)."""
    layout = RunLayout(tmp_path / "outputs" / "twin")
    layout.root.mkdir(parents=True)
    with holding(layout):
        with pytest.raises(RunDirBusy), removed_if_left_empty(layout.root), holding(layout):
            pass
        assert layout.root.is_dir()
    with pytest.raises(ValueError), removed_if_left_empty(layout.root):
        raise ValueError("a bad value before anything was written")
    assert not layout.root.exists()  # a start that failed on its own still leaves no empty folder
