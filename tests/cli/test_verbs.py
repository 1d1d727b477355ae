"""The `geneformer-colon` verbs (verbs.py): their own checks of the command line, one line and exit 2; what synth's
options change."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from geneformer_colon.cli import verbs as cli


@pytest.mark.parametrize("option", [["--batch-size", "0"], ["--chunk-cells", "-5"], ["--batch-size", "-5"]])
def test_predict_counts_below_one_are_one_line(trained_runs, new_cells, tmp_path, capsys, option):
    with pytest.raises(SystemExit) as ended:
        cli.main(["predict", str(trained_runs[0]), str(new_cells), "--out", str(tmp_path / "out.h5ad"), *option])
    assert ended.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{option[0]} is {option[1]}; give an integer >= 1" in error
    assert not (tmp_path / "out.h5ad").exists()


def test_history_appended_to_a_folder_is_one_line_and_writes_nothing(trained_runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as ended:
        cli.main(["history", str(trained_runs[0]), "--append", str(tmp_path)])
    assert ended.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"--append {tmp_path}: a folder; give the training log's file" in error
    assert not list(tmp_path.iterdir())


def test_synth_donor_shift_writes_the_cohort_of_that_shift(tmp_path, capsys):
    from geneformer_colon.data.synthetic import write_synthetic_kul3

    def text(path: Path) -> bytes:
        return gzip.decompress(path.read_bytes())

    size = {"n_cells": 120, "n_genes": 100}
    expected = {shift: write_synthetic_kul3(tmp_path / str(shift), **size, donor_shift=shift)["matrix"]
                for shift in (0.0, 1.0)}
    assert text(expected[0.0]) != text(expected[1.0])  # 1 is the default
    cli.main(["synth", str(tmp_path / "cli"), "--cells", "120", "--genes", "100", "--donor-shift", "0"])
    printed = [Path(line) for line in capsys.readouterr().out.split()]
    assert text(next(path for path in printed if path.name == expected[0.0].name)) == text(expected[0.0])
