"""Tables as text (text_tables.py): cells as a reader wants them, markdown escaped, a wide table split into parts that
fit (each with its key columns), a piped table never cut to a terminal's width."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from rich.console import Console

from geneformer_colon.common.text_tables import TextTable, cell_text, markdown_table, print_table


def test_cells_round_floats_and_show_missing_values_as_a_dash():
    assert [cell_text(value) for value in (0.41234, np.float32(0.5), 3, "KUL01", None, float("nan"), pd.NA)] == [
        "0.412", "0.500", "3", "KUL01", "-", "-", "-"]


def test_markdown_escapes_bars_and_line_breaks_in_cells():
    table = markdown_table(["run", "val macro F1"], [["a|b", 0.5], ["two\nlines", None]])
    assert table.splitlines() == ["| run | val macro F1 |", "|---|---|", "| a\\|b | 0.500 |", "| two lines | - |"]


def test_a_wide_table_is_split_into_parts_that_fit_each_with_its_key_column():
    headers = ["run", *(f"metric {i}" for i in range(6))]
    table = TextTable("Runs", headers, [["colon6", *range(6)], ["colon7", *range(6, 12)]], numeric=headers[1:],
                      note="a note")
    assert table.fitted(table.width()) == [table]
    parts = table.fitted(40)
    assert len(parts) > 1 and all(part.width() <= 40 for part in parts)
    assert all(part.headers[0] == "run" and [row[0] for row in part.rows] == ["colon6", "colon7"] for part in parts)
    assert [header for part in parts for header in part.headers[1:]] == headers[1:]  # every column once, in order
    assert parts[1].title == f"Runs (continued, 2 of {len(parts)})"
    assert [part.note for part in parts] == [""] * (len(parts) - 1) + ["a note"]
    assert parts[0].markdown().startswith("## Runs\n\n| run | metric 0 |")


def test_a_table_printed_to_a_pipe_is_not_cut_to_the_terminals_width():
    out = io.StringIO()
    label = "a run label much longer than the twenty columns of this console"
    print_table("Runs", ["run", "val macro F1"], [[label, 0.41234]], numeric=["val macro F1"],
                console=Console(file=out, width=20))
    assert label in out.getvalue() and "0.412" in out.getvalue()
