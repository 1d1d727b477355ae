"""Issue 32's reliability cases of the run-start and cache side, each checked for its promise: one line on stderr
(``error: ...``), the exit code, and the sha256 of every file before and after (a refused start changes no byte
and leaves no folder, lock file or W&B run). The entry points run in this process (Hydra's own ``main`` on a
command line), so the cases stay fast; a damaged cache is rebuilt; a resumed run trains with the learning rate
its config gives."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from helpers.processes import one_error_line
from helpers.runs import fingerprints
from helpers.tiny import datamodule_of, tiny_overrides
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from geneformer_colon.cli import pretrain as pretrain_entry
from geneformer_colon.cli import train as train_entry
from geneformer_colon.common.caches import record_path
from geneformer_colon.common.errors import InputError
from geneformer_colon.jobs.train import train

QUICK = ["logger=csv", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1"]


@contextlib.contextmanager
def hydra_state_kept() -> None:
    """Hydra's global state and the logging it configures, put back after a Hydra app ran in this process."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None


def run_entry(main: Callable[[], object], arguments: list[str], capsys) -> tuple[int, str]:
    """A Hydra entry point as the command line runs it, in this process: its exit code and its stderr."""
    capsys.readouterr()
    argv = sys.argv
    sys.argv = ["train.py", *arguments]
    code = 0
    try:
        with hydra_state_kept():
            main()
    except SystemExit as ended:
        code = ended.code or 0
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


def refused(main: Callable[[], object], arguments: list[str], capsys, folder: Path, expected: str) -> str:
    """The command is refused (exit 2, one line containing ``expected``) and every file under ``folder`` is as it
    was, no file added (a lock file, a run folder) and none removed."""
    before = fingerprints(folder) if folder.exists() else {}
    code, err = run_entry(main, arguments, capsys)
    line = one_error_line(err)
    assert code == 2 and expected in line, (code, err)
    after = fingerprints(folder) if folder.exists() else {}
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
    return line


@pytest.fixture
def common(tmp_path, shared_dirs) -> list[str]:
    return tiny_overrides(tmp_path / "outputs", shared_dirs) + QUICK


@pytest.mark.parametrize(("arguments", "expected"), [
    (["~optimizer"], "~optimizer: the job needs its optimizer node"),
    (["threads=0"], "threads: 0; give a number of threads >= 1"),
    (["cv=lodo", "cv.seeds=[]"], "cv.seeds is []"),
    (["cv=lodo", "augment.mixup_prob=2"], "augment.mixup_prob is 2"),
    (["robust=group_dro", "data.train_donors=[KUL21]"], "acts across training donors, but the split trains on"),
    (["calibration=temperature", "data.val_donors=[]"], "calibration=temperature is fitted on the validation donors'"),
    (["cv=lodo", "cv.folds=[KUL01]", "data.train_donors=[KUL21]", "robust=group_dro", "logger=default"],
     "acts across training donors, but the split trains on"),
])
def test_a_refused_start_writes_nothing_no_folder_no_lock_no_wandb_run(common, tmp_path, capsys, arguments,
                                                                       expected):
    refused(train_entry.main, [*common, *arguments], capsys, tmp_path / "outputs", expected)
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").iterdir())


def test_pretraining_values_are_checked_before_any_data_is_made(tmp_path, capsys):
    fresh = {"data": tmp_path / "data", "cache": tmp_path / "cache"}
    arguments = tiny_overrides(tmp_path / "outputs", fresh) + ["pretrain.masking.select=2"]
    refused(pretrain_entry.main, arguments, capsys, tmp_path, "pretrain.masking.select is 2")
    assert not fresh["data"].exists() and not fresh["cache"].exists()


def test_a_finished_run_and_a_damaged_checkpoint_are_refused_without_a_change(common, tmp_path, capsys):
    code, err = run_entry(train_entry.main, [*common, "run_name=done", "logger=default"], capsys)
    assert code == 0, err
    outputs = tmp_path / "outputs"
    assert not (outputs / ".done.lock").exists()  # an exclusive hold takes its lock file with it
    # finished: resume=true says so and changes nothing (no re-test, no metrics.json, no second W&B run)
    refused(train_entry.main, [*common, "run_name=done", "logger=default", "resume=true"], capsys, outputs,
            "done: finished (metrics.json), and resume=true with its own recipe changes nothing")

    # an interrupted run whose last.ckpt was cut short: the message says what to do, not "use last.ckpt"
    shutil.copytree(outputs / "done", outputs / "cut")
    metrics = outputs / "cut" / "metrics.json"
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "status": "running"}))
    last = outputs / "cut" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    line = refused(train_entry.main, [*common, "run_name=cut", "resume=true"], capsys, outputs,
                   "cut/checkpoints/last.ckpt: not a PyTorch Lightning checkpoint, or a damaged one")
    assert "cannot be resumed from" in line and "use checkpoints/best.ckpt or last.ckpt" not in line


def test_a_refused_resume_of_a_cv_run_leaves_it_byte_identical(common, tmp_path, capsys):
    cv = [*common, "cv=lodo", "run_name=cv"]
    code, err = run_entry(train_entry.main, [*cv, "cv.folds=[KUL01]"], capsys)
    assert code == 0, err
    outputs = tmp_path / "outputs"
    assert (outputs / "cv" / ".hydra" / "config.yaml").is_file()
    assert not list((outputs / "cv").glob(".fold-*.lock"))
    for bad in (["augment.mixup_prob=2"], ["augment.mixup_prob=2", "allow_resume_changes=true"],
                ["optimizer.lr=1e-3"]):
        refused(train_entry.main, [*cv, "cv.folds=[KUL01,KUL19]", "resume=true", *bad], capsys, outputs, "")
    # every fold it names finished: resume=true changes nothing, and says so
    before = fingerprints(outputs)
    code, err = run_entry(train_entry.main, [*cv, "cv.folds=[KUL01]", "resume=true"], capsys)
    assert code == 0 and fingerprints(outputs) == before, err


def test_a_resumed_run_trains_with_the_changed_learning_rate(tiny_cfg, tmp_path):
    common = ["run_name=rate", *QUICK, "callbacks.early_stopping=null", "scheduler=constant"]
    train(tiny_cfg(*common, "trainer.max_epochs=1"))
    with pytest.raises(InputError, match=r"optimizer._target_ cannot change on resume \(torch.optim.AdamW -> "):
        train(tiny_cfg(*common, "trainer.max_epochs=2", "resume=true", "allow_resume_changes=true",
                       "optimizer=sgd"))
    train(tiny_cfg(*common, "trainer.max_epochs=2", "resume=true", "allow_resume_changes=true",
                   "optimizer.lr=1e-9"))
    logs = pd.concat(pd.read_csv(path) for path in (tmp_path / "outputs/rate/csv").glob("*/metrics.csv"))
    rates = logs.dropna(subset=["lr-AdamW/weights"]).set_index("step")["lr-AdamW/weights"]
    steps = len(rates) // 2  # an epoch's; the resumed epoch's steps follow
    assert (rates.iloc[:steps] > 1e-4).all() and rates.iloc[steps:].between(1e-10, 1e-9).all(), rates


def test_a_damaged_cache_is_rebuilt_with_a_warning_naming_it(tiny_cfg, cohort, caplog):
    first = datamodule_of(tiny_cfg())
    first.setup()
    store = first.store.directory
    tokens = (store / "tokens.bin").read_bytes()
    canonical = cohort(tiny_cfg())
    derived = [path / "token_dictionary.pkl" for path in (canonical.parent.parent / "dictionaries").iterdir()
               if record_path(path).is_file()]
    damaged = {store / "tokens.bin": tokens[: len(tokens) // 2], canonical: canonical.read_bytes()[:4096],
               **dict.fromkeys(derived, b"")}
    for path, cut in damaged.items():  # a full disk or a killed copy
        path.write_bytes(cut)
    caplog.set_level(logging.WARNING)
    again = datamodule_of(tiny_cfg())
    again.setup()
    warnings = [record.getMessage() for record in caplog.records]
    for path in (store, canonical, "dictionaries/"):
        assert any(f"{path}" in line and "damaged cache" in line for line in warnings), (path, warnings)
    assert again.store.directory == store and (store / "tokens.bin").read_bytes() == tokens
    assert len(again.store) == len(first.store) and again.dictionaries.token == first.dictionaries.token
