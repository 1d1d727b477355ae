"""The end of a run on the terminal: final metrics a row each (readable with many classes), success
criteria, and each donor's figures where a split has several (cell types are in metrics.json)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from geneformer_colon.common.names import EVAL_SPLITS, GROUPINGS, METRICS, TRUST_METRICS, per_class
from geneformer_colon.common.text_tables import print_table
from geneformer_colon.report.run_tables import group_rows


def trust_rows(record: Mapping[str, Any], splits: Sequence[str]) -> list[list[Any]]:
    """The calibration figures (and after calibration, where the run has one), AURC, the accuracy at 80%
    coverage and the conformal sets' coverage and size, a row each, where the splits have them."""
    def value(split: str, *keys: str) -> Any:
        found: Any = record[split]
        for key in keys:
            found = found.get(key) if isinstance(found, Mapping) else None
        return found

    paths = [*((title, (key,)) for key, title in TRUST_METRICS.items()),
             *((f"{title} calibrated", ("calibrated", key)) for key, title in TRUST_METRICS.items()),
             ("acc at 80% coverage", ("abstention", "at_80", "accuracy")),
             ("conformal coverage", ("conformal", "coverage")), ("conformal set size", ("conformal", "mean_set_size"))]
    return [[title, *(value(split, *keys) for split in splits)] for title, keys in paths
            if any(value(split, *keys) is not None for split in splits)]


def print_summary(record: Mapping[str, Any], class_names: Sequence[str], run_dir: Path,
                  console: Console | None = None) -> None:
    """The best checkpoint's metrics: a row a metric, a column a split (named with its donors)."""
    console = console or Console()
    splits = [split for split in EVAL_SPLITS if split in record]
    donors = record.get("donors", {})
    headers = ["metric", *(f"{split} ({', '.join(donors.get(split, []))})" if donors.get(split) else split
                           for split in splits)]
    rows = [[title, *(record[split].get(metric) for split in splits)] for metric, title in METRICS.items()]
    rows += [[f"recall {name}", *(record[split].get(per_class("recall", name)) for split in splits)]
             for name in class_names]
    rows += trust_rows(record, splits)
    best = record.get("best_epoch")
    title = f"{record.get('run_name')}" + (f": best epoch {best}" if best is not None else "")
    print_table(title, headers, rows, numeric=headers[1:], console=console)
    for split in splits:
        groups = record[split].get(GROUPINGS["donor"])
        if groups:
            headers, rows = group_rows(groups)
            print_table(f"{split} by donor", ["donor", *headers], rows, numeric=headers, console=console)
    for key, verdict in (record.get("success") or {}).items():
        mark = "[green]PASS[/green]" if verdict["passed"] else "[red]FAIL[/red]"
        console.print(f"{mark} {key} = {verdict['value']:.3f} (needs >= {verdict['threshold']:.2f})")
    console.print(f"run directory: {run_dir}")
