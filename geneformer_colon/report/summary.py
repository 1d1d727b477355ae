"""The end of a run: success criteria and the summary table printed to the terminal."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from geneformer_colon.errors import InputError


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


def print_summary(summary: Mapping[str, Any], class_names: Sequence[str], run_dir: Path) -> None:
    console = Console()
    table = Table(title=f"{summary['run_name']}: best epoch {summary['best_epoch']}")
    table.add_column("split")
    for column in ("accuracy", "macro F1", "ROC AUC", *(f"recall {name}" for name in class_names)):
        table.add_column(column, justify="right")
    for split in ("val", "test"):
        metrics = summary[split]
        values = [metrics["accuracy"], metrics["macro_f1"], metrics["macro_auroc"]]
        values += [metrics[f"recall/{name}"] for name in class_names]
        table.add_row(split, *(f"{value:.3f}" for value in values))
    console.print(table)
    for key, verdict in summary["success"].items():
        mark = "[green]PASS[/green]" if verdict["passed"] else "[red]FAIL[/red]"
        console.print(f"{mark} {key} = {verdict['value']:.3f} (needs >= {verdict['threshold']:.2f})")
    console.print(f"run directory: {run_dir}")
