"""Files written whole or not at all (io.py): atomic writes, a build done once, JSON, fingerprints."""

from __future__ import annotations

import math
import os

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
