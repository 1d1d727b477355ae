"""What a run writes as it goes: ``metrics.json`` (:func:`run_record`, the one schema of every kind of
run), the prediction tables and the loss plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from geneformer_colon.common.errors import InputError
from geneformer_colon.common.figures import plot_losses
from geneformer_colon.common.io import atomic_path, read_json, rounded, write_json
from geneformer_colon.common.names import FAILED, FINISHED, MONITOR
from geneformer_colon.runs.layout import RunLayout

# Decimals kept in metrics.json and cv.json.
DIGITS = 4
# metrics.json counts epochs from 1, as everything a user reads does (the epoch log lines, the end-of-run table,
# history.md, cv.md, W&B). Lightning's epoch index, from 0, stays inside training: a module's epoch_history, the
# checkpoints, the CSV log. A record says so (``epochs_from``); one without it is older, its epochs from 0
# (``runs.reading.current_record`` reads it as today's).
EPOCHS_FROM = 1


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
    ``epochs``: one dict a validation epoch (``epoch``, Lightning's index from 0, and ``val/<metric>``), and
    ``best_epoch`` Lightning's index too: both are written counted from 1 (:data:`EPOCHS_FROM`). ``final``: the
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
        "epochs_from": EPOCHS_FROM,
        "epochs": [{**epoch, "epoch": int(epoch["epoch"]) + EPOCHS_FROM} for epoch in epochs],
        "best_epoch": None if best_epoch is None else best_epoch + EPOCHS_FROM,
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
    """``plots/loss.png``: training loss (the CSV log's) and validation loss (``epochs``', a module's epoch history)
    by epoch, counted from 1 (both hold Lightning's index)."""
    train = {epoch + EPOCHS_FROM: loss for epoch, loss in train_losses(layout).items()}
    val_key = next((key for key in (epochs[0] if epochs else {}) if key.startswith("val/") and key.endswith("loss")),
                   None)
    val = {int(epoch["epoch"]) + EPOCHS_FROM: epoch[val_key] for epoch in epochs} if val_key else {}
    numbers = sorted(set(train) | set(val))
    if numbers:
        plot_losses(numbers, [train.get(n) for n in numbers], [val.get(n) for n in numbers], layout.loss_plot,
                    f"{run_name}: loss by epoch")

