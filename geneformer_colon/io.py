"""Atomic file and directory writes: nothing half-written is ever left at the final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it onto ``final`` if the block succeeds.

    Works for a file or a directory written at the yielded path. On an exception the
    temporary is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if final.is_dir() and tmp.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def file_fingerprint(*paths: str | os.PathLike[str] | None) -> str:
    """A cheap identity of input files: resolved path, size and modification time of each.

    Used as a cache key: a file replaced or edited in place changes its size or mtime.
    ``None`` entries (an optional input not given) are part of the key as such.
    """
    digest = hashlib.sha256()
    for path in paths:
        if path is None:
            digest.update(b"<none>\0")
            continue
        resolved = Path(path).resolve()
        stat = resolved.stat()
        digest.update(f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def write_json(path: str | os.PathLike[str], content: Any) -> None:
    """``content`` as indented JSON at ``path``, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2))
