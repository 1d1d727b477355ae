"""The run directory: its layout, the schema of ``metrics.json``, writing a run and reading it back.

Every other module names a run's files through :class:`RunLayout`, builds ``metrics.json``
through :func:`run_record`, and reads runs through :func:`read_run` / :func:`find_runs`::

    outputs/<run_name>/
      config.yaml                 the resolved config
      metrics.json                what the run did and scored (see run_record)
      checkpoints/best.ckpt       best val macro F1; last.ckpt: the latest state (resume=true)
      predictions/<split>.csv     cell id, donor, cell type, true, predicted, a probability a class
      plots/confusion_<split>.png, roc_<split>.png, pr_<split>.png, loss.png
      csv/                        Lightning's CSV log
      dictionaries/               the gene dictionaries the run used
      history.md                  the run as a training-log entry
      wandb/                      the offline W&B run and its id (wandb/run_id)
      eval/<name>/                eval.py on other cells: metrics.json, predictions/, plots/
      folds/<test donor>/         cv=lodo: one complete run directory a fold (with cv.seeds of two or more:
                                  folds/<test donor>/seed<k>/, one a seed)
      cv.json, cv.md              cv=lodo: the folds side by side and their aggregate
      hf/                         pretrain.py: the Hugging Face checkpoint and its dictionaries
      .hydra/, <job>.log          Hydra's record of the job and its log, once the start is accepted

One process at a time holds a run directory (:func:`holding`): the lock file ``.<run name>.lock``
beside it names the holder. Nothing is written into the directory until its start is accepted
(:func:`start_run`): a refused start leaves every byte of an earlier run as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.utilities import rank_zero_only

from geneformer_colon.config import plain, recipe_changes
from geneformer_colon.console import open_run_log
from geneformer_colon.errors import InputError
from geneformer_colon.figures import plot_losses
from geneformer_colon.io import LockHeld, atomic_path, held_lock, read_json, remove, rounded, write_json
from geneformer_colon.names import EVAL_SPLITS, FAILED, FINISHED, MONITOR, RUNNING, VAL, logged, per_class

log = logging.getLogger(__name__)

# Decimals kept in metrics.json and cv.json.
DIGITS = 4


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.json")
    history = property(lambda self: self.root / "history.md")
    checkpoints = property(lambda self: self.root / "checkpoints")
    predictions = property(lambda self: self.root / "predictions")
    plots = property(lambda self: self.root / "plots")
    csv = property(lambda self: self.root / "csv")
    dictionaries = property(lambda self: self.root / "dictionaries")
    wandb = property(lambda self: self.root / "wandb")
    wandb_run_id = property(lambda self: self.root / "wandb" / "run_id")
    evaluations = property(lambda self: self.root / "eval")
    folds = property(lambda self: self.root / "folds")
    cv_json = property(lambda self: self.root / "cv.json")
    cv_markdown = property(lambda self: self.root / "cv.md")
    cv_plot = property(lambda self: self.root / "plots" / "cv_per_donor.png")
    loss_plot = property(lambda self: self.root / "plots" / "loss.png")
    hf = property(lambda self: self.root / "hf")
    embeddings = property(lambda self: self.root / "embed")
    hydra = property(lambda self: self.root / ".hydra")
    # beside the directory, not in it: taking the lock changes nothing of the run
    lock = property(lambda self: self.root.parent / f".{self.root.name}.lock")

    def fold_lock(self, test_donor: str) -> Path:
        """A CV fold's lock, in the parent (a lock in folds/ would make any directory look cross-validated)."""
        return self.root / f".fold-{test_donor}.lock"

    def checkpoint(self, which: str = "best") -> Path:
        return self.checkpoints / f"{which}.ckpt"

    def prediction_file(self, split: str) -> Path:
        return self.predictions / f"{split}.csv"

    def confusion_plot(self, split: str) -> Path:
        return self.plots / f"confusion_{split}.png"

    def curve_plot(self, curve: str, split: str) -> Path:
        """``curve``: ``roc`` or ``pr`` (precision-recall)."""
        return self.plots / f"{curve}_{split}.png"

    def evaluation(self, name: str) -> RunLayout:
        return RunLayout(self.evaluations / name)

    def fold(self, test_donor: str, seed: int | None = None) -> RunLayout:
        """A fold's run directory; with ``seed``, that seed's run of the fold."""
        return RunLayout(self.folds / test_donor / (f"seed{seed}" if seed is not None else ""))

    def written(self) -> list[Path]:
        """What a run wrote here (Hydra's own .hydra/ and log file are not the run's)."""
        names = (self.config, self.metrics, self.history, self.checkpoints, self.predictions, self.plots, self.csv,
                 self.dictionaries, self.wandb, self.evaluations, self.folds, self.cv_json, self.cv_markdown,
                 self.hf, self.embeddings)
        return [path for path in names if path.exists()]

    def holds_a_run(self) -> bool:
        """A checkpoint, a finished record or folds: something a new run must not silently replace.

        A directory left by a start that failed before training (config, dictionaries, no
        checkpoint) holds no run: it may be cleared.
        """
        has_checkpoint = self.checkpoints.is_dir() and any(self.checkpoints.glob("*.ckpt"))
        return has_checkpoint or read_json(self.metrics).get("status") == FINISHED or self.folds.is_dir() \
            or self.hf.is_dir()


# ---- writing ----


def save_config(layout: RunLayout, cfg: DictConfig) -> None:
    with atomic_path(layout.config) as tmp:
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))


def start_run(layout: RunLayout, cfg: DictConfig) -> None:
    """The start is accepted (every check passed): the run's config.yaml and, in the directory Hydra
    runs the job in, Hydra's record of the job (``.hydra/``, which Hydra itself is told not to write
    before the checks) and its log file."""
    save_config(layout, cfg)
    if not HydraConfig.initialized() or Path(HydraConfig.get().runtime.output_dir).resolve() != layout.root.resolve():
        return
    hydra_cfg = HydraConfig.get()
    record = {"config.yaml": cfg, "hydra.yaml": OmegaConf.create({"hydra": hydra_cfg}),
              "overrides.yaml": hydra_cfg.overrides.task}
    for name, content in record.items():
        with atomic_path(layout.hydra / name) as tmp:
            tmp.write_text(OmegaConf.to_yaml(content))
    open_run_log()


class RunDirBusy(InputError):
    """Another process holds the run directory."""


@contextlib.contextmanager
def holding(layout: RunLayout, lock: Path | None = None, shared: bool = False) -> Iterator[None]:
    """Hold the run directory for the block, or refuse at once (:class:`RunDirBusy`) naming its holder.

    ``lock``: the lock file (default the directory's own). ``shared``: readers (eval.py, the jobs of one
    CV run) may hold it together, never beside a run that writes it. A DDP rank other than 0 shares its
    rank 0's hold. A start refused before writing anything leaves no empty directory behind.
    """
    if rank_zero_only.rank != 0:
        yield
        return
    holder = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
    try:
        with held_lock(lock or layout.lock, holder, shared):
            try:
                yield
            except BaseException:
                if layout.root.is_dir() and not any(layout.root.iterdir()):
                    layout.root.rmdir()  # made by Hydra, before any check
                raise
    except LockHeld as held:
        raise RunDirBusy(f"{layout.root}: in use by {held.holder}; wait for it to end, or pick another "
                         "run_name=...") from None


def run_record(
    run_name: str,
    kind: str,
    status: str,
    donors: Mapping[str, Sequence[str]],
    cells: Mapping[str, int] | None = None,
    epochs: Sequence[Mapping[str, Any]] = (),
    final: Mapping[str, Mapping[str, Any]] | None = None,
    best_epoch: int | None = None,
    best_checkpoint: str | None = None,
    init_from: str | None = None,
    success: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
    error: str | None = None,
    data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of ``metrics.json``, the one schema every kind of run writes.

    ``kind``: train, baseline, pretrain or eval. ``donors`` and ``cells``: the donors and the
    number of cells of each split.
    ``epochs``: one dict a validation epoch (``epoch`` and ``val/<metric>``). ``final``: the
    best checkpoint's metrics per split (headline metrics, per-class ``precision/<class>``,
    ``recall/<class>``, ``f1/<class>``, ``loss``, ``confusion_matrix``, ``cells`` and, for a split
    of several donors or cell types, ``by_donor`` / ``by_cell_type``). ``recipe``: the
    command-line overrides and the config groups chosen, as typed. ``data``: where the cells came from
    (``DataSource.provenance``).
    """
    record: dict[str, Any] = {
        "run_name": run_name,
        "kind": kind,
        "status": status,
        "donors": {split: list(names) for split, names in donors.items()},
        "cells": dict(cells or {}),
        "epochs": [dict(epoch) for epoch in epochs],
        "best_epoch": best_epoch,
        "best_checkpoint": best_checkpoint,
        "init_from": init_from,
        **{split: dict(metrics) for split, metrics in (final or {}).items()},
        "success": dict(success or {}),
        "recipe": dict(recipe or {}),
    }
    if data is not None:
        record["data"] = dict(data)
    if error is not None:
        record["error"] = error
    return record


def check_success(criteria: Mapping[str, float], final: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """Each criterion ``"<split>/<metric>": threshold`` passes when the final value reaches it."""
    verdicts = {}
    for key, threshold in criteria.items():
        split, _, metric = key.partition("/")
        if split not in final or metric not in final[split]:
            raise InputError(f"success_criteria: {key!r} names no final metric; use e.g. val/macro_f1 or test/accuracy")
        value = float(final[split][metric])
        verdicts[key] = {"threshold": float(threshold), "value": value, "passed": value >= float(threshold)}
    return verdicts


def write_metrics(layout: RunLayout, record: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``metrics.json`` (figures to DIGITS decimals); the record as written."""
    written = rounded(dict(record), DIGITS)
    write_json(layout.metrics, written)
    return written


def mark_failed(layout: RunLayout, error: str) -> None:
    """``metrics.json``: status failed and the error, keeping the epochs done so far; a finished
    record is never overwritten (a job may fail because its folder already held a run)."""
    record = read_json(layout.metrics)
    if record.get("status") != FINISHED:
        write_json(layout.metrics, {**record, "status": FAILED, "error": error})


def best_epoch(epochs: Sequence[Mapping[str, Any]], monitor: str = MONITOR, mode: str = "max") -> int | None:
    """The first epoch with the best monitored value, highest or lowest by ``mode`` (what ModelCheckpoint keeps)."""
    if not epochs:
        return None
    sign = 1 if mode == "max" else -1
    return max(epochs, key=lambda epoch: (sign * epoch[monitor], -epoch["epoch"]))["epoch"]


def write_predictions(layout: RunLayout, split: str, table: pd.DataFrame) -> None:
    with atomic_path(layout.prediction_file(split)) as tmp:
        table.to_csv(tmp, index=False)


def train_losses(layout: RunLayout) -> dict[int, float]:
    """Each epoch's training loss from the run's CSV log (a resumed run's later logs win); {} without one."""
    losses: dict[int, float] = {}
    for log_file in sorted(layout.csv.glob("*/metrics.csv"), key=lambda path: path.stat().st_mtime_ns):
        table = pd.read_csv(log_file)
        column = next((c for c in table.columns if c.startswith("train/") and c.endswith("loss_epoch")), None)
        if column is not None and "epoch" in table.columns:
            rows = table.dropna(subset=[column, "epoch"])
            losses.update(zip(rows["epoch"].astype(int), rows[column].astype(float)))
    return losses


def write_loss_plot(layout: RunLayout, epochs: Sequence[Mapping[str, Any]], run_name: str) -> None:
    """``plots/loss.png``: training loss (the CSV log's) and validation loss (``epochs``') by epoch."""
    train = train_losses(layout)
    val_key = next((key for key in (epochs[0] if epochs else {}) if key.startswith("val/") and key.endswith("loss")),
                   None)
    val = {int(epoch["epoch"]): epoch[val_key] for epoch in epochs} if val_key else {}
    numbers = sorted(set(train) | set(val))
    if numbers:
        plot_losses(numbers, [train.get(n) for n in numbers], [val.get(n) for n in numbers], layout.loss_plot,
                    f"{run_name}: loss by epoch")


# ---- starting, resuming ----


def recipe() -> dict[str, Any]:
    """The command line as typed (overrides and config groups chosen), when running as a Hydra app."""
    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    return {"overrides": list(hydra_cfg.overrides.task), "choices": {
        group: choice for group, choice in hydra_cfg.runtime.choices.items()
        if not group.startswith("hydra") and choice is not None}}


def prepare_run_dir(layout: RunLayout, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory; clear what a start that failed before training left."""
    if rank_zero_only.rank != 0:  # a DDP rank: its rank 0 has checked (and maybe cleared) the directory
        return
    written = layout.written()
    if written and layout.holds_a_run() and not overwrite:
        raise InputError(
            f"{layout.root}: already holds a run ({', '.join(path.name for path in written)}); continue it with "
            "resume=true, replace it with overwrite=true, or pick another run_name=..."
        )
    if written and not layout.holds_a_run():
        log.info("%s: clearing what a start that failed before training left", layout.root)
    for path in written:
        remove(path)


def default_recipe() -> dict[str, Any]:
    """The config the running Hydra app composes with no override, each key at its default; empty outside a
    Hydra app."""
    if not (HydraConfig.initialized() and GlobalHydra.instance().is_initialized()):
        return {}
    try:
        return plain(compose(config_name=HydraConfig.get().job.config_name))
    except (HydraException, OmegaConfBaseException) as error:
        log.warning("the default config could not be composed (%s); a key a resumed run lacks counts as a change",
                    error)
        return {}


def allowed_changes(layout: RunLayout, cfg: DictConfig, ignore: tuple[str, ...] = ()) -> dict[str, tuple[str, str]]:
    """How ``cfg``'s recipe differs from the one the run directory's config.yaml records; refused unless
    ``allow_resume_changes=true``. A key added since the run started counts only where ``cfg`` sets it to
    another value than its default."""
    changes = recipe_changes(read_config(layout.config), plain(cfg), ignore, default_recipe())
    if changes and not cfg.allow_resume_changes:
        listed = "; ".join(f"{key}: {was} -> {now}" for key, (was, now) in changes.items())
        raise InputError(
            f"{layout.config}: another recipe than the run's ({listed}); go on with the run's own settings, or "
            "add allow_resume_changes=true to go on with the new ones (config.yaml then records both)"
        )
    return changes


def resume_point(layout: RunLayout, cfg: DictConfig) -> tuple[Path, dict[str, tuple[str, str]]]:
    """The checkpoint ``resume=true`` goes on from, and the recipe changes it was allowed to make."""
    last = layout.checkpoint("last")
    if not last.is_file():
        raise InputError(f"{layout.root}: resume=true but there is no checkpoints/last.ckpt to continue from; "
                         "start it without resume=true")
    read_checkpoint(last)
    return last, allowed_changes(layout, cfg)


def record_changes(cfg: DictConfig, layout: RunLayout, changes: dict[str, tuple[str, str]]) -> None:
    """On a resume allowed to change the recipe: config.yaml keeps each resume's changes (before, after)."""
    earlier = read_config(layout.config).get("resume_changes") or []
    with open_dict(cfg):
        cfg.resume_changes = [*earlier, {key: list(values) for key, values in changes.items()}] if changes else earlier


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A ``.ckpt`` file, or a run directory's ``checkpoints/<which>.ckpt``."""
    path = Path(path)
    checkpoint = RunLayout(path).checkpoint(which) if path.is_dir() else path
    if not checkpoint.is_file():
        raise InputError(f"{checkpoint}: no checkpoint there; give a run directory holding "
                         f"checkpoints/{which}.ckpt or a .ckpt file")
    return checkpoint


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint file loaded safely (tensors and plain data only), or one clear error.

    A file holding code or arbitrary objects is refused, never loaded with ``weights_only=False``.
    """
    if not zipfile.is_zipfile(path):  # what torch.save and Lightning write
        raise InputError(f"{path}: not a PyTorch Lightning checkpoint (not a PyTorch zip archive); use "
                         "checkpoints/best.ckpt or last.ckpt of a run directory")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"{path}: holds objects a checkpoint written by train.py does not hold (code, classes); "
                         "it is not loaded: use a checkpoint from a run directory") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile, AttributeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: not a PyTorch Lightning checkpoint ({reason[:200]}); use checkpoints/best.ckpt "
                         "or last.ckpt of a run directory") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise InputError(f"{path}: not a PyTorch Lightning checkpoint (no state_dict); use checkpoints/best.ckpt "
                         "or last.ckpt of a run directory")
    return checkpoint


# ---- reading ----

RUN_MARKERS = ("metrics.json", "config.yaml", "cv.json", ".hydra/config.yaml")


@dataclass
class Run:
    """One run directory as read from disk; ``metrics`` is empty while there is no metrics.json."""

    path: Path
    metrics: dict[str, Any]
    config: dict[str, Any]
    cv: dict[str, Any]

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.path)

    @property
    def is_cv(self) -> bool:
        return bool(self.cv)

    @property
    def status(self) -> str:
        if self.is_cv:
            return str(self.cv.get("status", RUNNING))
        return str(self.metrics.get("status", "no metrics.json"))

    @property
    def finished(self) -> bool:
        if self.is_cv:
            return bool(self.cv.get("folds"))
        return self.status == FINISHED and all(split in self.metrics for split in EVAL_SPLITS)

    @property
    def epochs(self) -> list[dict[str, float]]:
        return list(self.metrics.get("epochs", []))

    @property
    def name(self) -> str:
        return str(self.metrics.get("run_name") or self.cv.get("run_name") or self.config.get("run_name")
                   or self.path.name)

    def headline(self, split: str, metric: str) -> float:
        """A final figure: the run's own, or for a CV run the mean over its folds (NaN if absent)."""
        if self.is_cv:
            return self._across_folds(split, metric, "mean")
        value = self.metrics.get(split, {}).get(metric)
        return np.nan if value is None else float(value)

    def spread(self, split: str, metric: str) -> float:
        """For a CV run, the standard deviation over its folds (NaN below two folds); NaN otherwise."""
        return self._across_folds(split, metric, "sd")

    def _across_folds(self, split: str, metric: str, statistic: str) -> float:
        value = self.cv.get("aggregate", {}).get(split, {}).get(metric, {}).get(statistic)
        return np.nan if value is None else float(value)

    @property
    def class_names(self) -> list[str]:
        """From the per-class recalls of the final metrics, else of the epochs, else the config."""
        source = self.metrics.get(VAL) or (self.epochs[-1] if self.epochs else {})
        recall = per_class("recall", "")
        names = [key.rsplit("/", 1)[1] for key in source if key.startswith((recall, logged(VAL, recall)))]
        return names or list(self.cv.get("class_names", [])) or list(self.config.get("data", {}).get("labels") or [])

    def donors(self, split: str) -> list[str]:
        """The donors of a split: recorded by the run, else the config's (train: not recorded there)."""
        recorded = self.metrics.get("donors", {}).get(split)
        if recorded is not None:
            return list(recorded)
        return list(self.config.get("data", {}).get(f"{split}_donors") or [])


def read_config(path: Path) -> dict[str, Any]:
    """A YAML config as plain containers (resolved where its interpolations allow), {} if absent."""
    if not path.is_file():
        return {}
    try:
        loaded = OmegaConf.load(path)
    except (OmegaConfBaseException, OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable config ({error}); the run directory is damaged") from None
    try:
        return OmegaConf.to_container(loaded, resolve=True)
    except OmegaConfBaseException:  # e.g. a resolver only a Hydra app has
        return OmegaConf.to_container(loaded, resolve=False)


def read_run(path: str | os.PathLike[str]) -> Run:
    """metrics.json, cv.json and the config of a run directory (config.yaml, else Hydra's copy)."""
    layout = RunLayout(Path(path))
    metrics = read_json(layout.metrics)
    if layout.metrics.is_file() and not metrics:
        metrics = {"status": "unreadable metrics.json"}
    config = read_config(layout.config) or read_config(layout.root / ".hydra" / "config.yaml")
    return Run(path=layout.root, metrics=metrics, config=config, cv=read_json(layout.cv_json))


def is_run_dir(path: Path) -> bool:
    return any((path / marker).is_file() for marker in RUN_MARKERS)


def find_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Run directories among ``paths`` and under them.

    A run's own sub-folders (eval/, folds/) are not separate runs: a CV run is one run.
    """
    found: dict[Path, None] = {}
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise InputError(f"{path}: no such directory; give run directories or sweep roots")
        before = len(found)
        for folder, subfolders, _ in os.walk(path):
            folder_path = Path(folder)
            if is_run_dir(folder_path):
                found[folder_path.resolve()] = None
                subfolders.clear()
            else:
                subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        if len(found) == before:
            raise InputError(f"{path}: holds no run directory (none with {', '.join(RUN_MARKERS)} at any depth)")
    return list(found)
