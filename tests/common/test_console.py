"""The console of every command (console.py): a bad input is one line and exit 2, also when Hydra wrapped it or it
came from a file; an interrupted run exits 128 + the signal; the run's log file waits for the start to be accepted."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytest
from helpers.processes import run_script
from helpers.runs import bad_checkpoints, metrics_of
from helpers.tiny import compose_train, tiny_overrides

from geneformer_colon.common.console import RunLogFile, report_input_errors
from geneformer_colon.common.errors import InputError, Interrupted, input_error_in
from geneformer_colon.jobs.train import train


def test_a_bad_input_is_one_line_exit_2_an_interruption_128_plus_the_signal_and_a_bug_a_traceback(capsys):
    @report_input_errors
    def job(error: BaseException):
        raise error

    def wrapped() -> RuntimeError:  # as Hydra wraps an error raised while it instantiates a config
        try:
            raise InputError("loss.focal_gamma is -1; set it to a number >= 0")
        except InputError as error:
            try:
                raise RuntimeError("Error in call to target 'FocalLoss':\nInputError(...)") from error
            except RuntimeError as hydras:
                return hydras

    for error in (InputError("data.batch_size is 0; set it to an integer >= 1"), wrapped()):
        with pytest.raises(SystemExit) as ended:
            job(error)
        assert ended.value.code == 2
        assert capsys.readouterr().err == f"error: {input_error_in(error)}\n"
    with pytest.raises(SystemExit) as ended:
        job(Interrupted.resumable(signal.SIGTERM, Path("run/checkpoints/last.ckpt")))
    assert ended.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err == \
        "interrupted by SIGTERM: continue from run/checkpoints/last.ckpt with resume=true\n"
    with pytest.raises(ZeroDivisionError):  # not the user's input: no exit 2, the traceback as it is
        job(ZeroDivisionError("a bug"))


def test_the_run_log_keeps_its_records_until_the_start_is_accepted(tmp_path):
    handler = RunLogFile(str(tmp_path / "train.log"))
    record = logging.LogRecord("geneformer_colon", logging.INFO, __file__, 1, "before the start", None, None)
    handler.emit(record)
    assert not (tmp_path / "train.log").exists()  # a refused start writes nothing into the run directory
    handler.open()
    handler.emit(logging.LogRecord("geneformer_colon", logging.INFO, __file__, 2, "after it", None, None))
    handler.close()
    assert (tmp_path / "train.log").read_text().splitlines() == ["before the start", "after it"]


# Each path to a one-line error: a value checked up front, an error raised inside an object Hydra
# builds (which Hydra wraps), and the two ways a checkpoint file is refused.
IN_A_PROCESS = {
    "optimizer.lr=0": "optimizer.lr is 0; set it to a number > 0",
    "augment.mixup_prob=2": "augment.mixup_prob is 2",
    "init_from={text}": "notes.ckpt: not a PyTorch Lightning checkpoint",
    "init_from={code}": "code.ckpt: holds objects a checkpoint written by train.py does not hold",
}


IN_THIS_PROCESS = {
    "data.batch_size=0": "data.batch_size is 0; set it to an integer >= 1",
    "trainer.max_epochs=0": "trainer.max_epochs is 0; set it to an integer >= 1",
    "model.tokenizer.input_size=0": "model.tokenizer.input_size is 0",
    "loss.focal_gamma=-1": "loss.focal_gamma is -1",
    "data.max_tokens=100": "data.max_tokens is 100, less than one cell",
}


@pytest.mark.slow  # many processes: run by make test-slow (CI too)
def test_each_bad_value_or_file_is_one_line_and_exit_2_then_the_fixed_run_works(tmp_path, shared_dirs):
    checkpoints = bad_checkpoints(tmp_path / "files")
    common = tiny_overrides(tmp_path / "outputs", shared_dirs) + ["run_name=same0", "logger=csv"]
    cases = [case.format(**checkpoints) for case in IN_A_PROCESS]
    logs = {case: open(tmp_path / f"{number}.log", "w+") for number, case in enumerate(cases)}
    for pair in (cases[:2], cases[2:]):  # two processes at a time, each on its own run directory (one holds it)
        running = {case: run_script("train.py", *common, case, f"run_name=same{number}", wait=False,
                                    stdout=logs[case], stderr=logs[case])
                   for number, case in enumerate(pair)}
        for case, process in running.items():
            assert process.wait(timeout=300) == 2, (case, logs[case].name)
    for case, expected in zip(cases, IN_A_PROCESS.values()):
        logs[case].seek(0)
        output = logs[case].read()
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and expected in errors[0], (case, output[-2000:])
        assert "Traceback" not in output and "Error in call to target" not in output, case
        assert "weights_only=False" not in output and "this must never run" not in output, case
    for case, expected in IN_THIS_PROCESS.items():
        with pytest.raises(Exception) as raised:
            train(compose_train(common + [case]))
        error = input_error_in(raised.value)
        assert error is not None and expected in str(error) and "\n" not in str(error), (case, raised.value)
    # the same run_name works once the value is fixed: a failed start blocks nothing
    train(compose_train(common + ["trainer.fast_dev_run=true"]))
    assert metrics_of(tmp_path / "outputs/same0")["status"] == "finished"
