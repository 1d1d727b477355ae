"""A command's output folder (output_folder.py): written whole, one writer, only its own files replaced."""

from __future__ import annotations

import json

import pytest

from geneformer_colon.common.errors import InputError
from geneformer_colon.common.output_folder import WRITTEN, output_folder


def write(folder, **files):
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def contents(folder):
    return {str(path.relative_to(folder)): path.read_text() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_the_new_folder_replaces_the_old_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with output_folder(out, "perturb") as written:
        write(written, **{"genes.csv": "old", "plots/top.png": "old"})
        assert not out.exists()  # nothing at the final place until the block succeeds
    before = contents(out)
    assert set(before) == {"genes.csv", "plots/top.png", WRITTEN}
    assert json.loads(before[WRITTEN])["command"] == "perturb"
    with pytest.raises(RuntimeError), output_folder(out, "perturb") as written:
        write(written, **{"genes.csv": "new"})
        raise RuntimeError("stopped half-way")
    assert contents(out) == before
    with output_folder(out, "perturb") as written:
        write(written, **{"genes.md": "new"})
    assert set(contents(out)) == {"genes.md", WRITTEN}  # the earlier run's files do not linger beside the new ones
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # no temporary folder, no lock file


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "out"
    with output_folder(out, "perturb") as written:
        write(written, **{"genes.csv": "first"})
        with pytest.raises(InputError, match=r"out: being written by perturb \(pid \d+ on .*\); wait for it"):
            with output_folder(out, "explain"):
                pass
    assert contents(out)["genes.csv"] == "first"


def test_a_users_file_or_an_edited_one_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "out"
    with output_folder(out, "export") as written:
        write(written, **{"config.json": "{}", "README.md": "card"})
    write(out, **{"notes.txt": "mine"})
    with pytest.raises(InputError, match="holds notes.txt, not written by export or changed since.*--overwrite"):
        with output_folder(out, "export"):
            pass
    (out / "notes.txt").unlink()
    write(out, **{"README.md": "my own card"})
    with pytest.raises(InputError, match="holds README.md, not written by export"):
        with output_folder(out, "export"):
            pass
    assert contents(out)["README.md"] == "my own card"
    with output_folder(out, "export", overwrite=True) as written:
        write(written, **{"README.md": "card"})
    assert contents(out)["README.md"] == "card"


def test_another_commands_folder_is_not_taken_for_its_own(tmp_path):
    out = tmp_path / "out"
    with output_folder(out, "embed") as written:
        write(written, **{"silhouette.json": "{}"})
    with pytest.raises(InputError, match="holds silhouette.json, not written by perturb"):
        with output_folder(out, "perturb"):
            pass


def test_a_folder_written_before_the_record_is_trusted_for_the_commands_own_names(tmp_path):
    out = tmp_path / "out"
    write(out, **{"umap_donor.png": "x", "silhouette.json": "{}", "notes.txt": "mine"})
    with pytest.raises(InputError, match="holds notes.txt,"):
        with output_folder(out, "embed", ("umap_*.png", "silhouette.json")):
            pass
    (out / "notes.txt").unlink()
    with output_folder(out, "embed", ("umap_*.png", "silhouette.json")) as written:
        write(written, **{"silhouette.json": "new"})
    assert contents(out)["silhouette.json"] == "new"
