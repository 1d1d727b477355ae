"""Hydra multirun jobs: a failed job is recorded and the sweep goes on; the sweep root's summary.

Each job of ``python train.py -m ...`` keeps a small record in ``<sweep dir>/.jobs/<num>.json``
(its overrides, run directory, status and error) as it starts and as it ends, and then rewrites
``summary.csv`` and ``summary.md`` in the sweep root from all the records and the jobs'
``metrics.json``. Records are one file per job and the rewrite holds a lock, so jobs that end
at the same time on several workers (a SLURM array) lose no row.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch.distributed
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write
from pytorch_lightning.utilities import rank_zero_only

from geneformer_colon.common.errors import input_error_in
from geneformer_colon.common.io import atomic_path, file_lock, read_json, write_json
from geneformer_colon.common.names import FAILED, FINISHED, RUNNING, VAL, column, logged
from geneformer_colon.report.run_tables import RUN_COLUMNS, column_title, frame_markdown, run_row, runs_frame
from geneformer_colon.report.wandb_run import record_refused_job, report_sweep_run
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.lock import RunDirBusy
from geneformer_colon.runs.reading import read_run
from geneformer_colon.runs.record import mark_failed

log = logging.getLogger(__name__)

RECORDS = ".jobs"
COLUMNS = ["job", "overrides", *RUN_COLUMNS, "run_dir", "error", "note"]
# The note of a row that is no job of this sweep: an Optuna study's best trial, run by another invocation.
STUDY_BEST = "the study's best trial, run by another invocation"
# In the sweep root of sweep=optuna: the study as this invocation left it (geneformer_colon.jobs.study.save_study).
STUDY_FILE = "study.json"
# What the summary ranks jobs by.
RANKING = column(VAL, "macro_f1")
# What a failed job returns: a maximising optimiser ranks it last; sweep=optuna makes it a failed trial.
FAILED_JOB_VALUE = float("-inf")
# Job folder names are cut to this many bytes (file systems allow 255): Optuna's long floats
# and a few constant overrides would exceed it.
MAX_DIRNAME_BYTES = 200
# Set by Lightning's DDP launcher in the process that starts the other ranks.
LAUNCHER_ENVIRON = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


# A number of five or more decimals (an Optuna draw: 0.23456789012345678).
LONG_NUMBER = re.compile(r"(?<![\w.])-?\d+\.\d{5,}(?:[eE][-+]?\d+)?")


def short_numbers(text: str) -> str:
    """``text`` with every long number rounded to 4 significant digits, for names and summaries."""
    return LONG_NUMBER.sub(lambda match: f"{float(match.group()):.4g}", text)


def job_dirname(num: int, overrides: str) -> str:
    """``<num>_<overrides>`` as one folder name: ``/`` made ``_``, long numbers rounded to 4 significant
    digits, at most MAX_DIRNAME_BYTES bytes (the job number keeps names distinct).

    A name cut short ends in a hash of the whole name, so two jobs never share a folder.
    """
    name = short_numbers(f"{num}_{overrides}".replace("/", "_")) if overrides else str(num)
    if len(name.encode()) <= MAX_DIRNAME_BYTES:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return name.encode()[: MAX_DIRNAME_BYTES - 9].decode(errors="ignore") + "~" + digest


# conf/hydra/default.yaml names job folders with ${job_dirname:...}; every process that
# resolves the sweep's config (train.py, a SLURM worker unpickling the job) imports this module.
if not OmegaConf.has_resolver("job_dirname"):
    OmegaConf.register_new_resolver("job_dirname", job_dirname)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_sweep_job(task: Callable[[DictConfig], float], cfg: DictConfig) -> float:
    """One job of a multirun: ``task(cfg)``, recorded; a failure returns FAILED_JOB_VALUE.

    The exception is logged (an input error as one line) and written to the job's record and
    its ``metrics.json``; the launcher then starts the next job instead of ending the sweep.
    Ctrl-C and SIGTERM still end the sweep.
    """
    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(hydra_cfg.sweep.dir)
    record = {"job": int(hydra_cfg.job.num), "overrides": list(hydra_cfg.overrides.task),
              "run_dir": str(cfg.paths.run_dir), "status": RUNNING, "error": None}
    save_record(sweep_dir, record)
    try:
        with lightning_ranks_follow_this_job(hydra_cfg):
            value = task(cfg)
        record["status"] = FINISHED
    except Exception as error:  # any failure of one job is that job's, not the sweep's
        bad_input = input_error_in(error)
        if bad_input is not None:
            log.error("job %d failed: %s", record["job"], bad_input)
            error = bad_input
        else:
            log.exception("job %d failed", record["job"])
        record.update(status=FAILED, error=f"{type(error).__name__}: {error}")
        if rank_zero_only.rank == 0 and not isinstance(bad_input, RunDirBusy):  # a held directory is not this job's
            mark_failed(RunLayout(cfg.paths.run_dir), record["error"])
            record_refused_job(cfg, error)
        value = FAILED_JOB_VALUE
    table = save_record(sweep_dir, record)
    if table is not None:
        log.info("job %d in %s:\n%s", record["job"], sweep_dir / "summary.md",
                 table_markdown(table[table["job"] == record["job"]]))
    return value


@contextlib.contextmanager
def lightning_ranks_follow_this_job(hydra_cfg: DictConfig) -> Iterator[None]:
    """Make the ranks Lightning's DDP launcher starts run this job, in this job's folder.

    The launcher re-runs ``sys.argv`` (here the whole sweep, ``-m`` and all) with
    ``hydra.run.dir=<hydra.run.dir>`` added: for the job's duration the command line becomes
    the job's own overrides as a single run and ``hydra.run.dir`` the job's folder. The
    launcher's environment variables are undone afterwards so that the next job starts its
    own ranks. Where SLURM or torchrun start the ranks, nothing is re-run and this is moot.
    """
    argv = list(sys.argv)
    environ = {key: os.environ.get(key) for key in LAUNCHER_ENVIRON}
    sys.argv[1:] = [*hydra_cfg.overrides.task, "hydra.mode=RUN"]
    with read_write(hydra_cfg.run):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv[:] = argv
        for key, value in environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        # Lightning leaves its process group up until the process exits: the next job needs its own.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@rank_zero_only
def save_record(sweep_dir: Path, record: dict[str, Any]) -> pd.DataFrame:
    """Write a job's record, then rewrite the sweep's summary; return it."""
    write_json(sweep_dir / RECORDS / f"{record['job']}.json", record)
    return write_summary(sweep_dir)


def varying_overrides(jobs: Sequence[Sequence[str]]) -> list[list[str]]:
    """Each job's overrides without those every job shares (all of them while there is one job)."""
    if len(jobs) < 2:
        return [list(job) for job in jobs]
    shared = set(jobs[0]).intersection(*jobs[1:])
    return [[override for override in job if override not in shared] for job in jobs]


def read_study(sweep_dir: Path) -> dict[str, Any]:
    """The sweep's study.json, {} where the sweep ran no study."""
    return read_json(sweep_dir / STUDY_FILE)


def study_best_record(sweep_dir: Path, records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """An Optuna study's best trial as a job record, where another invocation of the study ran it."""
    best = read_study(sweep_dir).get("best")
    if not best or best["run_dir"] in {record["run_dir"] for record in records}:
        return None
    return {"job": best["trial"], "overrides": best["overrides"], "run_dir": best["run_dir"], "status": FINISHED,
            "error": None, "note": STUDY_BEST}


def summary_table(sweep_dir: Path) -> pd.DataFrame:
    """One row a job: overrides that differ, status, best epoch (folds of a CV job), final metrics
    (a CV job's means over its folds, with the standard deviation of macro F1), error. In an
    Optuna study, also the study's best trial where another invocation ran it (its note says so)."""
    records = sorted((read_json(path) for path in (sweep_dir / RECORDS).glob("*.json")), key=lambda r: r.get("job", -1))
    records = [record for record in records if "job" in record]
    records += [best] if (best := study_best_record(sweep_dir, records)) else []
    rows = []
    for record, overrides in zip(records, varying_overrides([r["overrides"] for r in records])):
        run = read_run(record["run_dir"]) if record["status"] == FINISHED else None
        rows.append({"job": record["job"], "overrides": short_numbers(" ".join(overrides)),
                     **run_row(run, record["status"]), "run_dir": record["run_dir"], "error": record["error"],
                     "note": record.get("note")})
    return runs_frame(rows, COLUMNS, drop_empty=False).astype({"job": "Int64"})


def job_counts(table: pd.DataFrame) -> dict[str, int]:
    """How many of this sweep's own jobs (not the study's best trial run by another invocation) are finished,
    failed, running."""
    counts = table[table["note"].isna()]["status"].value_counts()
    return {status: int(counts.get(status, 0)) for status in (FINISHED, FAILED, RUNNING)}


def best_row(table: pd.DataFrame) -> pd.Series | None:
    """The row of the best val macro F1 (in an Optuna study, over every invocation); None while none has one."""
    scored = table.dropna(subset=[RANKING])
    return scored.loc[scored[RANKING].idxmax()] if len(scored) else None


def markdown(table: pd.DataFrame, sweep_dir: Path) -> str:
    """The summary as a markdown page: counts, the best job by val macro F1 (in an Optuna study, the
    study's best trial over every invocation), the table."""
    counts = job_counts(table)
    lines = [f"# Sweep {sweep_dir}", "",
             f"{sum(counts.values())} jobs: " + ", ".join(f"{n} {status}" for status, n in counts.items())]
    study = read_study(sweep_dir)
    if study:
        trials = ", ".join(f"{n} {state}" for state, n in study["trials"].items())
        lines.append(f"Optuna study {study['study']}: {sum(study['trials'].values())} trials ({trials})")
    best = best_row(table)
    if best is not None:
        what = "trial" if study else "job"
        lines.append(f"best {column_title(RANKING)}: {what} {best['job']} ({best[RANKING]:.3f}) {best['overrides']}"
                     + (f" ({best['note']}: {best['run_dir']})" if isinstance(best["note"], str) else ""))
    return "\n".join(lines) + "\n\n" + table_markdown(table)


def sweep_figures(table: pd.DataFrame) -> dict[str, Any]:
    """The sweep's W&B summary: its jobs' counts (``jobs``, ``jobs/<status>``) and the best job's number,
    overrides and val macro F1 under ``best/`` (so the sweep's run is no other run's ``val/macro_f1``)."""
    counts = job_counts(table)
    figures: dict[str, Any] = {"jobs": sum(counts.values()), **{f"jobs/{status}": n for status, n in counts.items()}}
    best = best_row(table)
    if best is not None:
        figures.update({"best/job": int(best["job"]), "best/overrides": best["overrides"],
                        f"best/{logged(VAL, 'macro_f1')}": float(best[RANKING])})
    return figures


def table_markdown(table: pd.DataFrame) -> str:
    """Rows of the summary as a markdown table (the note column only when a row has a note)."""
    shown = runs_frame(table.to_dict("records"), [c for c in table.columns if c != "note" or table[c].notna().any()])
    return frame_markdown(shown.assign(run_dir=[Path(path).name for path in shown["run_dir"]]))


def write_summary(sweep_dir: Path) -> pd.DataFrame:
    """Rewrite ``summary.csv`` and ``summary.md`` in the sweep root (atomically, one writer at a time)."""
    with file_lock(sweep_dir / RECORDS / ".lock"):
        table = summary_table(sweep_dir)
        with atomic_path(sweep_dir / "summary.csv") as tmp:
            table.to_csv(tmp, index=False, float_format="%.4g")
        with atomic_path(sweep_dir / "summary.md") as tmp:
            tmp.write_text(markdown(table, sweep_dir))
    return table


class SweepSummary(Callback):
    """Registered in conf/hydra/default.yaml: as a sweep ends, its summary once more, where it is, and the
    sweep's own W&B run holding it (:func:`report_sweep_run`); as it starts, Optuna's messages through
    Python logging (Hydra's log file and console) instead of its own coloured handler, whose colour codes
    would land in log files."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "optuna" in str(config.hydra.sweeper.get("_target_", "")):
            import optuna

            optuna.logging.disable_default_handler()
            optuna.logging.enable_propagation()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not any((sweep_dir / RECORDS).glob("*.json")):  # an app whose jobs do not go through run_sweep_job
            return
        table = write_summary(sweep_dir)
        log.info("sweep done: %s; summary in %s", ", ".join(f"{n} {status}" for status, n in job_counts(table).items()),
                 sweep_dir / "summary.md")
        try:
            report_sweep_run(config, sweep_dir, table, sweep_figures(table),
                             [sweep_dir / "summary.csv", sweep_dir / "summary.md", sweep_dir / STUDY_FILE],
                             study=read_study(sweep_dir).get("study"))
        except Exception as error:  # every job is done and recorded: W&B failing (online, no network) fails none
            log.warning("the sweep's own W&B run could not be made (%s); its summary is in %s", error,
                        sweep_dir / "summary.md")
