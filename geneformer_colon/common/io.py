"""Files on disk: atomic writes, builds done once under a lock, JSON in and out.

Nothing half-written is ever left at a final name: a file or directory is written at a
temporary sibling and renamed. A build that several processes may start at once (the ingest
cache, a token store, synthetic data) runs under a lock file, so it is done once and the
others reuse it; leftovers of a killed build are removed by the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

TEMPORARY_MARK = ".tmp-"


def temporary_sibling(final: Path) -> Path:
    return final.with_name(f".{final.name}{TEMPORARY_MARK}{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it onto ``final`` if the block succeeds.

    Works for a file or a directory written at the yielded path. On an exception the
    temporary is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    try:
        yield tmp
        share_as_umask_allows(tmp)
        if final.is_dir() and tmp.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        remove(tmp)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (setting it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_as_umask_allows(path: Path) -> None:
    """Give ``path`` (a file, or a directory and everything in it) the permissions a plain ``open`` or
    ``mkdir`` would: some writers create files readable by their owner only (safetensors' ``save_file``,
    ``tempfile``), which colleagues on a shared cluster then cannot read. Execute bits stay as they are."""
    if not path.exists() or path.is_symlink():
        return
    mask = current_umask()
    for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if item.is_symlink():
            continue
        wanted = (0o777 if item.is_dir() else 0o666) & ~mask
        mode = item.stat().st_mode & 0o7777
        if mode | wanted != mode:
            os.chmod(item, mode | wanted)


def remove(path: Path) -> None:
    """Delete a file or a directory tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock held on ``path`` (created if needed) for the block; waits for other holders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` is what it wrote into the lock file."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


@contextlib.contextmanager
def held_lock(path: Path, holder: str, shared: bool = False, remove_after: bool = False) -> Iterator[None]:
    """A lock on ``path`` held for the block, or :class:`LockHeld` at once if another process has it.

    ``shared``: several shared holders at a time, none beside an exclusive one. The holder's
    description is written into the file for whoever is refused. The lock is the kernel's (flock):
    a killed holder releases it, so a lock file left behind is never stale. ``remove_after`` (exclusive
    locks): the file is deleted before the lock is released; a process that locked the deleted file
    meanwhile (shared or not) sees it is no longer ``path``'s and tries again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder_was = handle.read().strip() or "another process"
            handle.close()
            raise LockHeld(holder_was) from None
        if same_file(handle, path):  # every holder checks: a file any holder may delete is removed at its end
            break
        handle.close()  # locked a file another holder deleted on its way out
    with handle:
        try:
            handle.truncate(0)
            handle.write(holder + "\n")
            handle.flush()
            yield
        finally:
            if remove_after:
                path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


def same_file(handle: IO[str], path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def build_once(final: str | os.PathLike[str], build: Callable[[Path], None], done: Callable[[Path], bool] | None = None
               ) -> bool:
    """Make ``final`` with ``build(tmp)`` unless it exists; return whether this call built it.

    The build holds ``.<name>.lock`` beside ``final``: a second process asking for the same
    ``final`` waits, then finds it built. Temporaries left by a killed build are removed first
    (while the lock is held nobody else can be writing them). ``done`` says whether ``final``
    is complete (default: it exists).
    """
    final = Path(final)
    is_done = done or (lambda path: path.exists())
    if is_done(final):
        return False
    with file_lock(final.with_name(f".{final.name}.lock")):
        if is_done(final):
            return False
        for leftover in final.parent.glob(f".{final.name}{TEMPORARY_MARK}*"):
            remove(leftover)
        with atomic_path(final) as tmp:
            build(tmp)
    return True


def file_fingerprint(*paths: str | os.PathLike[str] | None) -> str:
    """A cheap identity of input files: resolved path, size and modification time of each.

    Used as a cache key for files a user hands in: a file replaced or edited in place changes
    its size or mtime. ``None`` entries (an optional input not given) are part of the key as such.
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


def text_fingerprint(*parts: object) -> str:
    """A short stable hash of ``parts`` (their ``repr``), for cache keys of settings."""
    return hashlib.sha256("\0".join(repr(part) for part in parts).encode()).hexdigest()[:16]


def rounded(content: Any, digits: int = 4) -> Any:
    """``content`` with every float rounded to ``digits`` decimals (non-finite floats kept)."""
    if isinstance(content, float):
        return round(content, digits) if math.isfinite(content) else content
    if isinstance(content, dict):
        return {key: rounded(value, digits) for key, value in content.items()}
    if isinstance(content, (list, tuple)):
        return [rounded(value, digits) for value in content]
    return content


def write_json(path: str | os.PathLike[str], content: Any) -> None:
    """``content`` as indented JSON at ``path``, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2) + "\n")


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON object from ``path``; ``{}`` when the file is absent or not a JSON object."""
    try:
        content = json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return content if isinstance(content, dict) else {}


def open_text(path: Path) -> IO[str]:
    """A text file, gzipped (``.gz``) or plain, with line endings kept as they are."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="")
    return path.open("r", newline="")
