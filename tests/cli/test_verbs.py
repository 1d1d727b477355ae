"""The `geneformer-colon` verbs (verbs.py): their own checks of the command line, one line and exit 2."""

from __future__ import annotations

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
