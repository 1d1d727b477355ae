"""Files written whole or not at all (io.py): atomic writes, a build done once, JSON, fingerprints; files a run and
an export write are readable by group and others, as the umask allows."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import pytest

from geneformer_colon.common.io import (
    TEMPORARY_MARK,
    atomic_path,
    build_once,
    file_fingerprint,
    read_json,
    rounded,
    text_fingerprint,
    write_json,
)
from geneformer_colon.jobs.export import export_run


def test_a_failed_write_leaves_the_earlier_file_and_no_temporary(tmp_path):
    final = tmp_path / "table.md"
    final.write_text("earlier")
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_text("half")
        raise RuntimeError("stopped")
    assert final.read_text() == "earlier" and os.listdir(tmp_path) == ["table.md"]
    with atomic_path(final) as tmp:
        tmp.write_text("new")
    assert final.read_text() == "new" and os.listdir(tmp_path) == ["table.md"]


def test_a_folder_is_replaced_whole(tmp_path):
    final = tmp_path / "store"
    (final / "old").mkdir(parents=True)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("x")
    assert sorted(path.name for path in final.iterdir()) == ["new"]


def test_build_once_builds_once_and_clears_a_killed_builds_leftovers(tmp_path):
    final = tmp_path / "cache.bin"
    (tmp_path / f".cache.bin{TEMPORARY_MARK}dead").write_text("left by a killed build")
    built = []
    assert build_once(final, lambda tmp: built.append(tmp.write_text("1")))
    assert not build_once(final, lambda tmp: built.append(tmp.write_text("2")))
    assert final.read_text() == "1" and len(built) == 1
    assert not list(tmp_path.glob(f"*{TEMPORARY_MARK}*"))


def test_json_is_read_back_or_empty_and_floats_are_rounded(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, rounded({"f1": 0.123456, "values": [1.0000049, float("nan")], "n": 3}, 4))
    content = read_json(path)
    assert content["f1"] == 0.1235 and content["values"][0] == 1.0 and math.isnan(content["values"][1])
    assert content["n"] == 3
    for text in ("", "{not json", "[1, 2]"):
        path.write_text(text)
        assert read_json(path) == {}
    assert read_json(tmp_path / "absent.json") == {}


def test_fingerprints_follow_the_file_and_the_settings(tmp_path):
    path = tmp_path / "cells.h5ad"
    path.write_text("a")
    first = file_fingerprint(path, None)
    assert file_fingerprint(path, None) == first != file_fingerprint(path)
    path.write_text("ab")
    assert file_fingerprint(path, None) != first
    assert text_fingerprint("v1", 2048) == text_fingerprint("v1", 2048) != text_fingerprint("v1", 4096)


def _unreadable_by_others(root: Path) -> list[str]:
    return [str(path) for path in root.rglob("*") if path.is_file() and not path.stat().st_mode & stat.S_IROTH]


def test_files_of_a_run_and_an_export_are_readable_by_group_and_others(logged_cv_run, tmp_path):
    run_dir, _ = logged_cv_run
    assert not _unreadable_by_others(run_dir)
    mask = os.umask(0o022)
    try:
        export = export_run(run_dir / "folds" / "KUL01", tmp_path / "export")
    finally:
        os.umask(mask)
    assert (export / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert not _unreadable_by_others(export)
