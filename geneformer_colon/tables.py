"""Tables as text: markdown for the files a run or a comparison writes, rich for the terminal."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table


def cell_text(value: Any) -> str:
    """One table cell: floats to 3 decimals, missing values as ``-``."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{value:.3f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; ``|`` and line breaks in cells are escaped."""
    def line(cells: Iterable[Any]) -> str:
        return "| " + " | ".join(cell_text(cell).replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(headers), *(line(row) for row in rows)]) + "\n"


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[str] = (),
                console: Console | None = None) -> None:
    """A rich table on the terminal; piped output is not cut to the terminal's width."""
    console = console or Console()
    if not console.is_terminal:
        console.width = 1000
    table = Table(title=title)
    for header in headers:
        right = header in numeric
        table.add_column(header, justify="right" if right else "left", no_wrap=right)
    for row in rows:
        table.add_row(*(cell_text(value) for value in row))
    console.print(table)
