"""W&B's offline runs read back: what each ``offline-run-*`` folder's ``.wandb`` file holds, parsed with wandb's own
protobufs (no W&B server, no network)."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK_SIZE = 32768  # a .wandb file is a LevelDB-style log: 7-byte file header, then 32 KiB blocks
RECORD_HEADER = struct.Struct("<IHB")  # crc32c, length, chunk type (1 full, 2 first, 3 middle, 4 last)


@dataclass
class OfflineRun:
    """What one ``offline-run-*`` directory's ``.wandb`` file says about its run."""

    directory: Path
    id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    notes: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # define_metric: name or glob -> its MetricRecord
    exit_code: int | None = None  # None: the run was never finished
    resume: bool = False  # started with resume= (a part of a run that goes on: wandb sync joins it to the others)

    def rows(self, key: str) -> list[dict[str, Any]]:
        """The history rows that hold ``key``."""
        return [row for row in self.history if key in row]


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
        if kind == "run":  # the first describes the run; later ones change some fields (notes)
            for name, value in (("id", record.run.run_id), ("name", record.run.display_name),
                                ("group", record.run.run_group), ("job_type", record.run.job_type),
                                ("notes", record.run.notes), ("tags", list(record.run.tags))):
                if value:
                    setattr(run, name, value)
            run.config.update(_items(record.run.config.update))
            run.resume = run.resume or record.run.resume
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "metric":
            run.metrics[record.metric.name or record.metric.glob_name] = record.metric
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


def all_offline_runs(root: Path) -> list[OfflineRun]:
    """Every W&B offline run under ``root`` (a sweep's jobs, their folds)."""
    return [run for folder in sorted({path.parent.parent for path in root.rglob("wandb/offline-run-*")})
            for run in offline_runs(folder)]


def media_table(run: OfflineRun, key: str) -> dict:
    """A wandb.Table of the run's summary, from the JSON file its summary entry points to."""
    return json.loads((run.directory / "files" / run.summary[key]["path"]).read_text())
