"""Caches checked before use: a cache built once (:func:`io.build_once`) and recorded, so that a damaged one is
rebuilt instead of trusted.

A build records, beside the cache (``.<name>.check.json``), every file's size and a checksum of its first and
last MiB; the record is written before the cache takes its final name, so a cache never stands without its
record. Each use compares the cache with its record first (a stat and two reads a file): a file truncated by a
full disk or a killed copy, missing, or rewritten, and a cache made before records existed, is rebuilt under
the build's lock, with a warning naming it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from geneformer_colon.common.io import build_once, read_json, write_json

log = logging.getLogger(__name__)

# Bytes read from each end of a file for its checksum.
END_BYTES = 1 << 20


def record_path(cache: Path) -> Path:
    return cache.with_name(f".{cache.name}.check.json")


def file_check(path: Path) -> dict[str, int | str]:
    """A file's size and the sha256 of its first and last :data:`END_BYTES`."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(END_BYTES))
        if size > END_BYTES:
            handle.seek(max(END_BYTES, size - END_BYTES))
            digest.update(handle.read(END_BYTES))
    return {"bytes": size, "ends_sha256": digest.hexdigest()}


def contents(cache: Path) -> dict[str, dict[str, int | str]]:
    """The check of each file of a cache (a file: one entry named ``.``; a folder: its files by relative path)."""
    if cache.is_file():
        return {".": file_check(cache)}
    return {str(path.relative_to(cache)): file_check(path) for path in sorted(cache.rglob("*")) if path.is_file()}


def damage(cache: Path) -> str | None:
    """What makes ``cache`` differ from its record, or None when it matches."""
    recorded = read_json(record_path(cache)).get("files")
    if not isinstance(recorded, dict):
        return "it has no record of its files (made before caches were checked, or its build was killed)"
    found = contents(cache)
    for name, check in recorded.items():
        if name not in found:
            return f"{name} is missing"
        if found[name]["bytes"] != check.get("bytes"):
            return f"{name} has {found[name]['bytes']} bytes, {check.get('bytes')} when it was built"
        if found[name] != check:
            return f"{name} was changed since it was built"
    extra = sorted(set(found) - set(recorded))
    return f"{', '.join(extra)} was not part of it" if extra else None


def checked_cache(cache: str | os.PathLike[str], build: Callable[[Path], None]) -> bool:
    """:func:`io.build_once` of ``build``, recorded; a cache that does not match its record is rebuilt (a warning
    names it). Returns whether this call built it."""
    cache = Path(cache)
    warned = []

    def intact(path: Path) -> bool:
        if not path.exists():
            return False
        problem = damage(path)
        if problem and not warned:
            log.warning("%s: damaged cache (%s); building it again", path, problem)
            warned.append(problem)
        return problem is None

    def build_recorded(tmp: Path) -> None:
        build(tmp)
        write_json(record_path(cache), {"files": contents(tmp)})

    return build_once(cache, build_recorded, done=intact)
