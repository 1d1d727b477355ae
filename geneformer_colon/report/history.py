"""A run as an entry of the team's training log (markdown): where it started, what it changed, how it went."""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from geneformer_colon.errors import InputError
from geneformer_colon.io import atomic_path
from geneformer_colon.report.compare import (
    SPLITS,
    Run,
    display,
    flatten,
    is_noise,
    is_run_dir,
    markdown_table,
    read_run,
)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
HISTORY_FILE = "history.md"


@contextlib.contextmanager
def set_running_hydra_aside() -> Iterator[None]:
    """Let the compose API run inside a Hydra app (training writes its entry at the end of a run).

    ``initialize_config_dir`` refuses an initialised GlobalHydra; the app's is put back afterwards.
    """
    running = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        yield
    finally:
        GlobalHydra.instance().clear()
        if running is not None:
            GlobalHydra.instance().initialize(running)


@functools.cache
def default_config() -> tuple[dict[str, Any], frozenset[str]]:
    """``python train.py`` without overrides, as Hydra composes it: the flat resolved config, and
    the keys whose default is an interpolation (``data.tokenizer: ${model.tokenizer}``, ...)."""
    with set_running_hydra_aside(), initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train")
    unresolved = flatten(OmegaConf.to_container(cfg, resolve=False))
    derived = frozenset(key for key, value in unresolved.items() if isinstance(value, str) and "${" in value)
    try:
        return flatten(OmegaConf.to_container(cfg, resolve=True)), derived
    except OmegaConfBaseException:  # a resolver only a Hydra app has: the derived keys are skipped anyway
        return unresolved, derived


def follows_another_key(key: str, derived: frozenset[str]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:end]) in derived for end in range(1, len(parts) + 1))


def config_highlights(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(key, value, default) of each flat key whose value is not the default (``-``: no such default).

    Keys that merely follow another one by interpolation are left out (the other one is shown).
    """
    defaults, derived = default_config()
    rows = []
    for key, value in flatten(config).items():
        default = display(defaults[key]) if key in defaults else "-"
        if not is_noise(key) and not follows_another_key(key, derived) and display(value) != default:
            rows.append((key, display(value), default))
    return rows


def started_from(run: Run) -> str:
    if run.metrics.get("init_from"):
        return f"the best weights of `{run.metrics['init_from']}`"
    if "baseline" in run.config:
        return "no network: multinomial naive Bayes fitted on the training donors (`baseline.py`)"
    pretrained = run.config.get("model", {}).get("pretrained")
    return f"pretrained Geneformer `{pretrained}`" if pretrained else "random init (`model.architecture`)"


def epoch_table(run: Run, classes: Sequence[str]) -> str:
    if not run.epochs:
        return "_No epochs recorded._\n"
    headers = ["epoch", "acc", "macro F1", "ROC AUC", *(f"recall {name}" for name in classes)]
    rows = []
    for epoch in run.epochs:
        mark = " (best)" if epoch["epoch"] == run.metrics.get("best_epoch") else ""
        values = [epoch.get(f"val/{key}") for key in ("accuracy", "macro_f1", "macro_auroc")]
        rows.append([f"{epoch['epoch']}{mark}", *values, *(epoch.get(f"val/recall/{name}") for name in classes)])
    return markdown_table(headers, rows)


def final_table(run: Run, classes: Sequence[str]) -> str:
    per_class = [(kind, name) for kind in ("precision", "recall") for name in classes]
    headers = ["split", "acc", "macro F1", "ROC AUC", "loss", *(f"{kind} {name}" for kind, name in per_class)]
    rows = []
    for split in SPLITS:
        metrics = run.metrics[split]
        values = [metrics.get(key) for key in ("accuracy", "macro_f1", "macro_auroc", "loss")]
        rows.append([split, *values, *(metrics.get(f"{kind}/{name}") for kind, name in per_class)])
    return markdown_table(headers, rows)


def success_lines(run: Run) -> str:
    verdicts = run.metrics.get("success") or {}
    if not verdicts:
        return "_None declared._\n"
    return "".join(
        f"- {'PASS' if verdict['passed'] else 'FAIL'} `{key}` = {verdict['value']:.3f} "
        f"(needs >= {verdict['threshold']:.2f})\n"
        for key, verdict in verdicts.items()
    )


def history_entry(run_dir: str | os.PathLike[str]) -> str:
    """The run as a markdown training-log entry (the date is when its metrics.json was last written)."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise InputError(f"{run_dir}: not a run directory (no metrics.json or config.yaml); give one train.py wrote")
    run = read_run(run_dir)
    metrics_file = run_dir / "metrics.json"
    when = datetime.datetime.fromtimestamp(metrics_file.stat().st_mtime) if metrics_file.is_file() \
        else datetime.datetime.now()
    name = run.metrics.get("run_name") or run.config.get("run_name") or run_dir.name
    classes = run.class_names
    best = run.metrics.get("best_checkpoint")
    best_line = f"`{best}` (epoch {run.metrics.get('best_epoch')})" if best else "none"
    highlights = config_highlights(run.config)
    parts = [
        f"## {when:%Y-%m-%d %H:%M} · {name}\n",
        (f"- **Run directory:** `{run_dir}`\n"
         f"- **Started from:** {started_from(run)}\n"
         f"- **Status:** {run.status}\n"
         f"- **Best checkpoint:** {best_line}\n"),
        "**Config highlights** (what differs from the defaults of `conf/train.yaml`):\n",
        markdown_table(["key", "value", "default"], highlights) if highlights else "_The defaults._\n",
        "**Validation per epoch:**\n",
        epoch_table(run, classes),
    ]
    if run.finished:
        parts += ["**Final metrics** (best checkpoint):\n", final_table(run, classes),
                  "**Success criteria:**\n", success_lines(run)]
    else:
        parts.append(f"_No final metrics: the run is {run.status}._\n")
    return "\n".join(parts)


def write_history(run_dir: str | os.PathLike[str]) -> Path:
    """Write the run's entry to ``<run_dir>/history.md``; training calls this at the end of every run."""
    path = Path(run_dir) / HISTORY_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(history_entry(run_dir))
    return path


def append_history(entry: str, path: str | os.PathLike[str]) -> Path:
    """Append ``entry`` to a training log (created if absent), rewriting the file atomically."""
    path = Path(path)
    existing = path.read_text() if path.is_file() else ""
    with atomic_path(path) as tmp:
        tmp.write_text(f"{existing.rstrip()}\n\n{entry}" if existing.strip() else entry)
    return path
