"""A command's output folder (perturb, explain, embed, export, compare, predict's metrics), written whole.

- **Whole:** the files are written into a temporary sibling that takes the folder's place when the command
  succeeds, so a reader sees the previous complete folder or the new complete one, never a mix; an error,
  SIGTERM or Ctrl-C leaves the previous folder as it was.
- **One writer:** a second command writing the same folder is refused at once, in one line naming the holder
  (a kernel lock on a hidden sibling: a killed holder releases it).
- **Only its own files:** the folder records what it wrote, with hashes (``.written.json``); the next command
  replaces the folder only if every file in it is one a command of the same kind wrote and nobody edited since.
  Anything else (a user's README.md, an edited file) is named and refused, unless ``overwrite``. A folder
  written before that record existed is trusted for the names the command writes (``own_names``: top-level
  names or patterns, e.g. ``plots`` or ``umap_*.png``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import socket
from collections.abc import Collection, Iterator
from pathlib import Path

from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import LockHeld, held_lock, remove, share_as_umask_allows, temporary_sibling

WRITTEN = ".written.json"
HASH_CHUNK = 1 << 20


class FolderBusy(InputError):
    """Another command is writing the output folder."""


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_files(folder: Path) -> list[str]:
    """Every file under ``folder`` (links included, not followed), relative, sorted; the record excluded."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")
                  if (path.is_file() or path.is_symlink()) and path.name != WRITTEN)


def not_written_by(folder: Path, command: str, own_names: Collection[str]) -> list[str]:
    """The files in ``folder`` that ``command`` did not write there, or that were changed since."""
    record_path = folder / WRITTEN
    if not record_path.is_file():  # written before the record existed: trust the command's own names
        return [name for name in folder_files(folder)
                if not any(fnmatch.fnmatchcase(name.split(os.sep)[0], own) for own in own_names)]
    try:
        record = json.loads(record_path.read_text())
        hashes = record["files"] if record.get("command") == command else {}
    except (ValueError, KeyError, TypeError):
        hashes = {}
    return [name for name in folder_files(folder)
            if hashes.get(name) is None or (folder / name).is_symlink() or file_hash(folder / name) != hashes[name]]


def check_replaceable(folder: Path, command: str, own_names: Collection[str], overwrite: bool) -> None:
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir() or folder.is_symlink():
        raise InputError(f"{folder}: not a folder; give a new folder for the {command} output")
    if overwrite:
        return
    foreign = not_written_by(folder, command, own_names)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise InputError(f"{folder}: holds {shown}, not written by {command} or changed since; move them away or "
                         f"give another folder{' (or add --overwrite to replace it)' if command == 'export' else ''}")


def record_written(folder: Path, command: str) -> None:
    record = {"command": command, "files": {name: file_hash(folder / name) for name in folder_files(folder)}}
    (folder / WRITTEN).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def swap_in(new: Path, final: Path) -> None:
    """``new`` takes ``final``'s place; the previous ``final`` (if any) is removed after, never before."""
    if final.exists() or final.is_symlink():
        previous = temporary_sibling(final)
        os.replace(final, previous)
        os.replace(new, final)
        remove(previous)
    else:
        os.replace(new, final)


@contextlib.contextmanager
def output_folder(final: str | os.PathLike[str], command: str, own_names: Collection[str] = (),
                  overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder to write ``command``'s output into; it becomes ``final`` when the block
    succeeds (see the module docstring). Refused in one line while another writer holds ``final``, or when
    ``final`` holds files that are not ``command``'s own (unless ``overwrite``)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    holder = f"{command} (pid {os.getpid()} on {socket.gethostname()})"
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(held_lock(final.with_name(f".{final.name}.lock"), holder, remove_after=True))
        except LockHeld as held:
            raise FolderBusy(f"{final}: being written by {held.holder}; wait for it to end or give another folder"
                             ) from None
        check_replaceable(final, command, own_names, overwrite)
        tmp = temporary_sibling(final)
        try:
            tmp.mkdir()
            yield tmp
            record_written(tmp, command)
            share_as_umask_allows(tmp)
            swap_in(tmp, final)
        finally:
            remove(tmp)
