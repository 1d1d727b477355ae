"""Tables as text: markdown for the files a run or a comparison writes, rich for the terminal."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
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


def markdown_line(cells: Iterable[Any]) -> str:
    """A markdown table row; ``|`` and line breaks in cells are escaped."""
    return "| " + " | ".join(cell_text(cell).replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    return "\n".join([markdown_line(headers), "|" + "---|" * len(headers), *(markdown_line(row) for row in rows)]) \
        + "\n"


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[str] = (),
                console: Console | None = None) -> None:
    """A rich table on the terminal; piped output is not cut to the terminal's width."""
    console = console or Console()
    if not console.is_terminal:
        console.width = 1000
    table = Table(title=title)
    for number, header in enumerate(headers):  # the first column names the row: never wrapped
        right = header in numeric
        table.add_column(header, justify="right" if right else "left", no_wrap=right or number == 0)
    for row in rows:
        table.add_row(*(cell_text(value) for value in row))
    console.print(table)


@dataclass(frozen=True)
class TextTable:
    """A table built once, then written as markdown or printed on the terminal alike: its title, headers,
    rows, numeric (right-aligned) columns and a note under it."""

    title: str
    headers: list[str]
    rows: list[list[Any]]
    numeric: list[str] = field(default_factory=list)
    note: str = ""
    keys: int = 1  # the leading columns that name a row: repeated in each part of a table split to fit

    def column_widths(self) -> list[int]:
        """Each column's share of a markdown line: its widest cell and the separator."""
        return [max(len(cell_text(row[column])) for row in [self.headers, *self.rows]) + 3
                for column in range(len(self.headers))]

    def width(self) -> int:
        """The length of its longest markdown line."""
        return 1 + sum(self.column_widths())

    def fitted(self, width: int) -> list[TextTable]:
        """The table as it is if its lines fit ``width`` columns, else split into tables of consecutive
        columns that each fit (each repeating the key columns; at least one column more each)."""
        widths = self.column_widths()
        parts: list[list[int]] = [[]]
        for column in range(self.keys, len(widths)):
            used = 1 + sum(widths[: self.keys]) + sum(widths[c] for c in parts[-1])
            if parts[-1] and used + widths[column] > width:
                parts.append([])
            parts[-1].append(column)
        if len(parts) == 1:
            return [self]
        tables = []
        for number, part in enumerate(parts):
            columns = [*range(self.keys), *part]
            headers = [self.headers[c] for c in columns]
            tables.append(TextTable(self.title + (f" (continued, {number + 1} of {len(parts)})" if number else ""),
                                    headers, [[row[c] for c in columns] for row in self.rows],
                                    [h for h in headers if h in self.numeric], self.note if number == len(parts) - 1
                                    else "", self.keys))
        return tables

    def markdown(self, level: int = 2) -> str:
        note = f"\n{self.note}\n" if self.note else ""
        return f"{'#' * level} {self.title}\n\n{markdown_table(self.headers, self.rows)}{note}"

    def print(self, console: Console | None = None) -> None:
        console = console or Console()
        print_table(self.title, self.headers, self.rows, self.numeric, console)
        if self.note:
            console.print(self.note, highlight=False)
