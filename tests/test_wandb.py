"""W&B logging with the real wandb, offline: what each run's offline files hold, read back with wandb's protobufs."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import wandb
from conftest import REPO_ROOT, compose_train, tiny_overrides
from wandb.proto import wandb_internal_pb2

from geneformer_colon.fine_tune import train as run_training

BLOCK_SIZE = 32768  # a .wandb file is a LevelDB-style log: 7-byte file header, then 32 KiB blocks
RECORD_HEADER = struct.Struct("<IHB")  # crc32c, length, chunk type (1 full, 2 first, 3 middle, 4 last)


@dataclass
class OfflineRun:
    """What one ``offline-run-*`` directory's ``.wandb`` file says about its run."""

    directory: Path
    id: str = ""
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None  # None: the run was never finished


def _records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    position, chunks = 7, b""
    while position + RECORD_HEADER.size <= len(data):
        if BLOCK_SIZE - position % BLOCK_SIZE < RECORD_HEADER.size:  # block trailer padding
            position += BLOCK_SIZE - position % BLOCK_SIZE
            continue
        _, length, kind = RECORD_HEADER.unpack_from(data, position)
        if kind == 0 or position + RECORD_HEADER.size + length > len(data):  # the end, or still being written
            break
        chunks += data[position + RECORD_HEADER.size : position + RECORD_HEADER.size + length]
        position += RECORD_HEADER.size + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _items(items) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def read_offline_run(directory: Path) -> OfflineRun:
    run = OfflineRun(directory)
    (log,) = directory.glob("run-*.wandb")
    for record in _records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.id, run.name, run.group = record.run.run_id, record.run.display_name, record.run.run_group
            run.tags = list(record.run.tags)
            run.config.update(_items(record.run.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def offline_runs(run_dir: Path, timeout: float = 30.0) -> list[OfflineRun]:
    """The run directory's W&B offline runs, oldest first.

    wandb-core closes a run's file shortly after ``run.finish()`` returns: wait (up to
    ``timeout``) until every run's exit record is there.
    """
    deadline = time.monotonic() + timeout
    while True:
        runs = [read_offline_run(path) for path in sorted((run_dir / "wandb").glob("offline-run-*"))]
        if all(run.exit_code is not None for run in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.1)


def train(tmp_path: Path, shared: dict, *overrides: str) -> Path:
    cfg = compose_train(tiny_overrides(tmp_path / "outputs", shared) + list(overrides))
    run_training(cfg)
    return Path(cfg.paths.run_dir)


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def media_table(run: OfflineRun, key: str) -> dict:
    """A logged wandb.Table, from the JSON file its summary entry points to."""
    return json.loads((run.directory / "files" / run.summary[f"{key}/path"]).read_text())


def sweep(tmp_path: Path, shared: dict, *overrides: str) -> Path:
    """``train.py -m`` in a subprocess (jobs run one after another in one process); the sweep's directory."""
    sweep_dir = tmp_path / "multirun" / "2026-11-24" / "10-00-00"
    result = subprocess.run(
        [sys.executable, "train.py", "-m", *tiny_overrides(tmp_path / "outputs", shared), *overrides,
         f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


def test_each_sweep_job_is_a_wandb_run_with_flat_config_metrics_and_report(tmp_path, shared_dirs):
    sweep_dir = sweep(tmp_path, shared_dirs, "experiment=colon6", "loss.focal_gamma=1.5,0", "augment.mixup_prob=0.15",
                      "logger.wandb.tags=[mine]")
    job_runs = [offline_runs(sweep_dir / str(job)) for job in (0, 1)]
    assert [len(runs) for runs in job_runs] == [1, 1]
    (run,), (other,) = job_runs
    metrics = metrics_of(sweep_dir / "0")

    # one W&B run per job, finished, named after the run, grouped by the sweep
    assert run.id != other.id
    assert run.id == (sweep_dir / "0" / "wandb" / "run_id").read_text()
    assert (run.exit_code, other.exit_code) == (0, 0)
    assert (run.name, other.name) == ("colon6 #0: loss.focal_gamma=1.5", "colon6 #1: loss.focal_gamma=0")
    assert "lr-AdamW/weights" in {key for row in run.history for key in row}  # the learning rate, per step
    assert run.group == other.group == "2026-11-24/10-00-00"
    assert {"colon6", "synthetic", "tiny", "mine"} <= set(run.tags)
    # the config, flat and resolved, without Hydra's keys or paths
    assert (run.config["loss.focal_gamma"], other.config["loss.focal_gamma"]) == (1.5, 0.0)
    assert run.config["augment.mixup_prob"] == 0.15
    assert run.config["data.balance_strategy"] == "class_donor"
    assert run.config["loss.class_weights.Tumor"] == 2.2
    assert not [key for key in run.config if key.endswith("_target_") or key.startswith(("paths.", "logger."))]
    # the epoch's val metrics, as Lightning logged them
    epoch_rows = [row for row in run.history if "val/macro_f1" in row]
    assert epoch_rows[0]["val/macro_f1"] == pytest.approx(metrics["epochs"][0]["val/macro_f1"], abs=1e-4)
    assert epoch_rows[0]["val/recall/Tumor"] == pytest.approx(metrics["epochs"][0]["val/recall/Tumor"], abs=1e-4)
    # the best checkpoint's metrics and the success criteria as the run's summary
    for split in ("val", "test"):
        for name in ("macro_f1", "accuracy", "macro_auroc", "recall/Border"):
            assert run.summary[f"{split}/{name}"] == pytest.approx(metrics[split][name], abs=1e-4), (split, name)
    assert run.summary["best_epoch"] == metrics["best_epoch"]
    verdicts = {key: "PASS" if verdict["passed"] else "FAIL" for key, verdict in metrics["success"].items()}
    assert {key: run.summary[f"success/{key}"] for key in verdicts} == verdicts
    assert run.summary["success"] == ("PASS" if set(verdicts.values()) == {"PASS"} else "FAIL")
    assert other.summary["val/macro_f1"] == pytest.approx(metrics_of(sweep_dir / "1")["val"]["macro_f1"], abs=1e-4)
    # the per-class table and the confusion matrices
    per_class = media_table(run, "per_class")
    assert per_class["columns"] == ["split", "class", "precision", "recall", "f1", "cells"]
    rows = {(row[0], row[1]): row for row in per_class["data"]}
    assert len(rows) == 6
    assert rows["test", "Tumor"][3] == pytest.approx(metrics["test"]["recall/Tumor"], abs=1e-4)
    assert rows["val", "Normal"][5] == sum(metrics["val"]["confusion_matrix"][0])
    for split in ("val", "test"):
        table = media_table(run, f"confusion/{split}_table")
        counts = {(actual, predicted): n for actual, predicted, n in table["data"]}
        assert counts["Border", "Tumor"] == metrics[split]["confusion_matrix"][1][2]
        assert (run.directory / "files" / run.summary[f"confusion_plot/{split}/path"]).is_file()


class Crash(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, *args):
        raise RuntimeError("boom")


def test_a_failing_run_finishes_its_wandb_run_with_an_error_code(tmp_path, shared_dirs, monkeypatch):
    from geneformer_colon import fine_tune

    real_build_trainer = fine_tune.build_trainer
    monkeypatch.setattr(fine_tune, "build_trainer",
                        lambda cfg, callbacks: real_build_trainer(cfg, callbacks + [Crash()]))
    with pytest.raises(RuntimeError, match="boom"):
        train(tmp_path, shared_dirs, "run_name=crash")
    assert wandb.run is None
    (run,) = offline_runs(tmp_path / "outputs" / "crash")
    assert run.exit_code == 1
    assert run.config["loss.focal_gamma"] == 0.0


def test_resume_continues_the_same_wandb_run_and_overwrite_starts_anew(tmp_path, shared_dirs):
    run_dir = train(tmp_path, shared_dirs, "run_name=paused", "callbacks.early_stopping=null")
    assert wandb.run is None
    train(tmp_path, shared_dirs, "run_name=paused", "callbacks.early_stopping=null", "resume=true",
          "trainer.max_epochs=2", "allow_resume_changes=true")
    before, after = offline_runs(run_dir)
    assert before.id == after.id == (run_dir / "wandb" / "run_id").read_text()
    assert (before.name, before.group) == (after.name, after.group) == ("paused", "default")
    assert (before.exit_code, after.exit_code) == (0, 0)
    assert next(row["epoch"] for row in after.history if "val/macro_f1" in row) == 1
    assert after.summary["best_epoch"] == metrics_of(run_dir)["best_epoch"]

    train(tmp_path, shared_dirs, "run_name=paused", "overwrite=true", "trainer.fast_dev_run=true")
    assert offline_runs(run_dir) == []
    assert (run_dir / "wandb" / "run_id").read_text() != before.id


def test_csv_logger_alone_writes_no_wandb_files(tmp_path, shared_dirs):
    assert list(compose_train(["logger=csv"]).logger) == ["csv"]
    with_wandb = train(tmp_path, shared_dirs, "run_name=with_wandb", "trainer.fast_dev_run=true")
    csv_only = train(tmp_path, shared_dirs, "run_name=csv_only", "logger=csv", "trainer.fast_dev_run=true")
    assert (with_wandb / "wandb" / "run_id").is_file()
    assert not (csv_only / "wandb").exists()
