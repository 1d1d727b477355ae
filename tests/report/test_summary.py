"""The end-of-run table (summary.py) as a user reads it: its best epoch counted as the epoch log lines count."""

from __future__ import annotations

import re

EPOCH_LINE = re.compile(r"epoch (\d+)/\d+: .*?val macro F1 ([\d.]+),")


def test_the_best_epoch_printed_at_the_end_is_the_epoch_its_log_line_printed(logged_cv_run):
    """The fold's log lines (``epoch 2/2: ... val macro F1 0.41``) and its end-of-run table (``cv/KUL01: best epoch
    2``): the best epoch named at the end is the epoch whose line shows the best val macro F1 (the first of equals)."""
    _, output = logged_cv_run
    lines = [(int(epoch), float(f1)) for epoch, f1 in EPOCH_LINE.findall(output)]
    (printed,) = re.findall(r"cv/KUL01: best epoch (\d+)", output)
    assert len(lines) == 2
    best = max(lines, key=lambda line: (line[1], -line[0]))
    assert int(printed) == best[0]
