"""One process a run directory, nothing written by a refused start, Hydra's own errors in one line, and a CV
job paused between folds. The processes and signals are real."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import compose_train, fingerprints, run_script, tiny_overrides
from pytorch_lightning.utilities.exceptions import SIGTERMException

from geneformer_colon.cli.override_checks import check_command_line
from geneformer_colon.common.errors import InputError, Interrupted
from geneformer_colon.jobs import donor_cv
from geneformer_colon.jobs.baseline import run_baseline
from geneformer_colon.jobs.evaluate import run_evaluation
from geneformer_colon.jobs.train import train
from geneformer_colon.runs.config import CONF_DIR
from geneformer_colon.runs.lock import RunDirBusy

CONF = CONF_DIR


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output[-2000:]
    return lines[0]


@pytest.mark.slow
def test_two_train_processes_on_one_run_name_one_runs_and_a_refused_start_changes_no_byte(tmp_path, shared_dirs):
    common = tiny_overrides(tmp_path / "outputs", shared_dirs) + ["logger=csv", "trainer.limit_train_batches=3"]
    alone = train(compose_train(common + ["run_name=alone"]))
    # both stand still after their second step (the one holding the directory, until told to go on)
    marker = tmp_path / "paused.marker"
    pause = ["+callbacks.pause._target_=pause.PauseAtStep", "+callbacks.pause.epoch=0",
             "+callbacks.pause.batch=1", f"+callbacks.pause.marker={marker}"]
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


def test_cv_jobs_of_one_run_hold_their_own_folds(tmp_path, shared_dirs):
    """A second job on the same folds, or a run of one split on the CV run's directory: refused at once; a job
    on other folds runs beside (nested here in the first job's fold, which holds its locks meanwhile)."""
    common = tiny_overrides(tmp_path / "outputs", shared_dirs) + ["cv=lodo", "run_name=cv"]
    seen = {}

    def first_fold(fold_cfg):
        for name, overrides in (("same fold", ["cv.folds=[KUL01]"]), ("one split", ["cv=none"])):
            with pytest.raises(RunDirBusy, match=rf"in use by pid {os.getpid()} on "):
                donor_cv.run(run_baseline, compose_train(common + overrides, "baseline"))
            seen[name] = "refused"
        seen["other folds"] = donor_cv.run(run_baseline, compose_train(common + ["cv.folds=[KUL19]"], "baseline"))
        return run_baseline(fold_cfg)

    donor_cv.run(first_fold, compose_train(common + ["cv.folds=[KUL01]"], "baseline"))
    assert seen["same fold"] == seen["one split"] == "refused" and seen["other folds"] > 0
    cv = json.loads((tmp_path / "outputs" / "cv" / "cv.json").read_text())
    assert sorted(fold["test_donor"] for fold in cv["folds"]) == ["KUL01", "KUL19"]


def test_sigterm_between_folds_ends_the_job_after_the_fold_with_its_history(tmp_path, shared_dirs):
    common = tiny_overrides(tmp_path / "outputs", shared_dirs) + ["cv=lodo", "run_name=cv",
                                                                  "cv.folds=[KUL01,KUL19]"]

    def fold_then_sigterm(fold_cfg):
        record = run_baseline(fold_cfg)
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, while the job goes from one fold to the next
        return record

    with pytest.raises(Interrupted) as paused:
        donor_cv.run(fold_then_sigterm, compose_train(common, "baseline"))
    assert paused.value.exit_code == 128 + signal.SIGTERM and "resume=true" in str(paused.value)
    folds = tmp_path / "outputs" / "cv" / "folds"
    assert [path.name for path in folds.iterdir()] == ["KUL01"] and (folds / "KUL01" / "history.md").is_file()
    (folds / "KUL01" / "history.md").unlink()  # as a job killed between a fold's metrics and its history left it
    donor_cv.run(run_baseline, compose_train(common + ["resume=true"], "baseline"))
    assert all((folds / donor / "history.md").is_file() for donor in ("KUL01", "KUL19"))

    def evaluation_stopped(cfg):  # Lightning's answer to SIGTERM while it evaluates: a silent exit 0
        raise SIGTERMException

    with pytest.raises(Interrupted, match="SIGTERM"):
        donor_cv.run(evaluation_stopped, compose_train(tiny_overrides(tmp_path / "outputs", shared_dirs)))


# Each bad command line to (a part of) its one line.
BAD_COMMAND_LINES = {
    "optimizer.lrr=1": "optimizer.lrr: no such key in the config (did you mean optimizer.lr?)",
    "experiment=nope": "experiment=nope: experiment has no option 'nope'; choose one of colon1, colon3",
    "+optimizer.lrr=1": "+optimizer.lrr: torch.optim.AdamW takes no argument 'lrr' (did you mean optimizer.lr?)",
    "optimizer.lr=[1": "optimizer.lr=[1: not an override",
    "loss.focal_gamma=0,1.5": "several values are a sweep; add -m",
    "experimnt=colon6": "(did you mean experiment?)",
}


@pytest.mark.parametrize("config", ["train", "pretrain", "baseline"])
def test_hydras_errors_are_one_line_naming_the_closest_key_or_option(config):
    for argument, expected in BAD_COMMAND_LINES.items():
        if config == "pretrain" and argument.startswith(("experiment", "loss")):
            continue  # pretraining has no experiments nor loss
        with pytest.raises(InputError) as refused:
            check_command_line(CONF, config, [argument])
        assert expected in str(refused.value) and "\n" not in str(refused.value), (argument, str(refused.value))
    check_command_line(CONF, "train", ["-m", "loss.focal_gamma=0,1.5", "+callbacks.early_stopping.min_delta=1",
                                       "+callbacks.extra._target_=pytorch_lightning.callbacks.LearningRateMonitor"])


@pytest.mark.slow  # many processes: run by make test-slow (CI too)
def test_bad_command_lines_and_a_late_check_write_nothing(tmp_path, shared_dirs):
    outputs = tmp_path / "outputs"
    common = tiny_overrides(outputs, shared_dirs)
    for script, argument in (("train.py", "+optimizer.lrr=1"), ("pretrain.py", "data.val_donors=[]")):
        result = run_script(script, *common, argument)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and one_error_line(result.stderr)
        assert not [path for path in outputs.glob("*") if not path.name.startswith(".")]  # no run directory


def test_eval_overrides_name_the_closest_key_or_option(trained_runs):
    for argument, expected in (("data.tst_donors=[KUL21]", "(did you mean data.test_donors?)"),
                               ("data=h5a", "data has no option 'h5a' (did you mean h5ad?)")):
        with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
            run_evaluation(trained_runs[0], [argument], CONF)
    assert not Path(trained_runs[0], "eval").exists()
