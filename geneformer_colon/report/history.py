"""A run as an entry of the team's training log (markdown): where it started, its recipe, how it went.

The entry is written from what the run recorded (its config and metrics.json, or the config in
hand at the end of training); nothing is composed again.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path

from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import atomic_path
from geneformer_colon.common.names import EVAL_SPLITS, FINISHED, GROUPINGS, METRICS, VAL, logged, per_class
from geneformer_colon.common.text_tables import markdown_table
from geneformer_colon.report.cv_summary import cv_markdown
from geneformer_colon.report.run_tables import RUN_COLUMNS, frame_markdown, group_rows, run_row, runs_frame
from geneformer_colon.runs.config import display, flatten
from geneformer_colon.runs.reading import Run, is_run_dir, read_run

# The settings the team's log records for every run, in its column order.
RECIPE_KEYS = (
    "model.encoder._target_", "model.encoder.pretrained", "model.encoder.num_hidden_layers",
    "model.encoder.hidden_size", "model.pooling", "model.reinit_head", "model.freeze_layers",
    "model.tokenizer.model_version", "model.tokenizer.input_size", "init_from",
    "loss.class_weights.*", "loss.focal_gamma", "loss.label_smoothing",
    "data.balance_strategy", "data.batch_size", "data.max_tokens", "data.cell_types",
    "augment.token_mask_prob", "augment.mixup_prob", "augment.mixup_alpha",
    "optimizer._target_", "optimizer.lr", "optimizer.weight_decay", "scheduler.name", "scheduler.warmup_ratio",
    "trainer.max_epochs", "trainer.accumulate_grad_batches", "trainer.precision",
    "callbacks.early_stopping.patience", "cv.strategy", "pretrain.masking.*", "seed",
)


def recipe_rows(run: Run) -> list[tuple[str, str]]:
    flat = flatten(run.config)
    rows = []
    for pattern in RECIPE_KEYS:
        prefix = pattern[:-1] if pattern.endswith("*") else None
        keys = [key for key in flat if key.startswith(prefix)] if prefix else [pattern] if pattern in flat else []
        rows += [(key, display(flat[key])) for key in keys]
    return rows


def started_from(run: Run) -> str:
    if run.metrics.get("init_from"):
        return f"the best weights of `{run.metrics['init_from']}`"
    if "baseline" in run.config:
        name = run.config["baseline"].get("name", "naive_bayes")  # runs from before the baseline group: naive Bayes
        return f"no network: the `{name}` baseline fitted on the training donors (`baseline.py baseline={name}`)"
    pretrained = run.config.get("model", {}).get("encoder", {}).get("pretrained")
    return f"pretrained Geneformer `{pretrained}`" if pretrained else "random init (`model.encoder`)"


def data_source(run: Run) -> str:
    """Where a run's cells came from (metrics.json ``data``; a CV run: its first fold's), in words."""
    data = run.metrics.get("data")
    if data is None and run.layout.folds.is_dir():
        data = next((read_run(fold).metrics.get("data") for fold in sorted(run.layout.folds.iterdir())
                     if read_run(fold).metrics.get("data")), None)
    if not data:
        return "not recorded (a run of an earlier version)"
    if data.get("source") == "synthetic":
        return (f"the embedded synthetic KUL3 look-alike, not real cells (generator version "
                f"{data['generator_version']}, {data['n_cells']} cells x {data['n_genes']} genes, seed {data['seed']}, "
                f"donor shift {data['donor_shift']:g}; `{data['folder']}`)")
    files = "; ".join(f"`{item['path']}` ({item['bytes']:,} bytes, fingerprint {item['fingerprint']})"
                      for item in data.get("inputs", []))
    return f"{data.get('source', 'files')}: {files}"


def figures(run: Run, classes: Sequence[str]) -> list[tuple[str, str]]:
    """(title, metric) of what a run scores: a classifier's headline metrics and recall per class, else
    whatever its validation epochs hold (a pretraining run: masked-gene loss and accuracy)."""
    if run.metrics.get("kind") != "pretrain":
        return [*((title, key) for key, title in METRICS.items()), *((f"recall {name}", per_class("recall", name))
                                                                    for name in classes)]
    names = [key.split("/", 1)[1] for key in (run.epochs[0] if run.epochs else {}) if key.startswith(logged(VAL, ""))]
    return [(name.replace("_", " "), name) for name in names]


def epoch_table(run: Run, classes: Sequence[str]) -> str:
    if not run.epochs:
        return "_No epochs recorded._\n"
    columns = figures(run, classes)
    rows = []
    for epoch in run.epochs:
        mark = " (best)" if epoch["epoch"] == run.metrics.get("best_epoch") else ""
        rows.append([f"{epoch['epoch']}{mark}", *(epoch.get(logged(VAL, key)) for _, key in columns)])
    return markdown_table(["epoch", *(title for title, _ in columns)], rows)


def final_table(run: Run, classes: Sequence[str]) -> str:
    """A row a metric, a column a split that was scored (named with its donors)."""
    splits = [split for split in EVAL_SPLITS if split in run.metrics]
    headers = ["metric", *(f"{split} ({', '.join(run.donors(split))})" for split in splits)]
    rows = figures(run, classes)
    if run.metrics.get("kind") != "pretrain":
        rows = [*rows[: len(METRICS)], ("loss", "loss"), *((f"precision {name}", per_class("precision", name))
                                                           for name in classes), *rows[len(METRICS):]]
    return markdown_table(headers, [[title, *(run.metrics[split].get(key) for split in splits)] for title, key in rows])


def breakdown_tables(run: Run) -> list[str]:
    parts = []
    for split in EVAL_SPLITS:
        for column, key in GROUPINGS.items():
            name = column.replace("_", " ")
            groups = run.metrics.get(split, {}).get(key)
            if groups:
                headers, rows = group_rows(groups)
                parts += [f"**{split} by {name}:**\n", markdown_table([name, *headers], rows)]
    return parts


def success_lines(run: Run) -> str:
    verdicts = run.metrics.get("success") or {}
    if not verdicts:
        return "_None declared._\n"
    return "".join(
        f"- {'PASS' if verdict['passed'] else 'FAIL'} `{key}` = {verdict['value']:.3f} "
        f"(needs >= {verdict['threshold']:.2f})\n"
        for key, verdict in verdicts.items()
    )


def history_entry(run: Run, when: datetime.datetime | None = None) -> str:
    """The run as a markdown training-log entry."""
    when = when or datetime.datetime.now()
    classes = run.class_names
    best = run.metrics.get("best_checkpoint")
    best_line = f"`{best}` (epoch {run.metrics.get('best_epoch')})" if best else "none"
    overrides = run.metrics.get("recipe", {}).get("overrides")
    parts = [
        f"## {when:%Y-%m-%d %H:%M} · {run.name}\n",
        (f"- **Run directory:** `{run.path}`\n"
         f"- **Data:** {data_source(run)}\n"
         f"- **Started from:** {started_from(run)}\n"
         f"- **Status:** {run.status}\n"
         f"- **Donors:** val {', '.join(run.donors('val')) or '-'}, test {', '.join(run.donors('test')) or '-'}\n"
         f"- **Best checkpoint:** {best_line}\n"
         + (f"- **Command-line overrides:** `{' '.join(overrides)}`\n" if overrides else "")),
        "**Recipe:**\n",
        markdown_table(["setting", "value"], recipe_rows(run)),
        "**Validation per epoch:**\n",
        epoch_table(run, classes),
    ]
    if run.is_cv:
        parts = parts[:-2] + ["**Leave one donor out:**\n", cv_markdown(run.cv).split("\n", 2)[2]]
    elif run.status == FINISHED:
        parts += ["**Final metrics** (best checkpoint):\n", final_table(run, classes), *breakdown_tables(run),
                  "**Success criteria:**\n", success_lines(run)]
    else:
        parts.append(f"_No final metrics: the run is {run.status}._\n")
    parts += ["**As a row of the runs' table** (`geneformer-colon compare`, a sweep's summary):\n",
              frame_markdown(runs_frame([{"run": run.name, **run_row(run)}], ["run", *RUN_COLUMNS]))]
    return "\n".join(parts)


def run_history(run_dir: str | os.PathLike[str]) -> str:
    """The entry of a run directory on disk (dated when its metrics.json was last written)."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise InputError(f"{run_dir}: not a run directory (no metrics.json or config.yaml); give one train.py wrote")
    run = read_run(run_dir)
    metrics_file = run.layout.metrics
    when = datetime.datetime.fromtimestamp(metrics_file.stat().st_mtime) if metrics_file.is_file() else None
    return history_entry(run, when)


def write_history(run: Run) -> Path:
    """Write the run's entry to its ``history.md``; a run calls this as it ends, with the config in hand."""
    path = run.layout.history
    with atomic_path(path) as tmp:
        tmp.write_text(history_entry(run))
    return path


def append_history(entry: str, path: str | os.PathLike[str]) -> Path:
    """Append ``entry`` to a training log (created if absent), rewriting the file atomically."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--append {path}: a folder; give the training log's file, e.g. "
                         f"{path / 'TRAINING_HISTORY.md'}")
    existing = path.read_text() if path.is_file() else ""
    with atomic_path(path) as tmp:
        tmp.write_text(f"{existing.rstrip()}\n\n{entry}" if existing.strip() else entry)
    return path
