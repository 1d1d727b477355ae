"""One process at a time holds a run directory (:func:`holding`): the lock file ``.<run name>.lock``
beside it names the holder."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from pytorch_lightning.utilities import rank_zero_only

from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import LockHeld, held_lock
from geneformer_colon.runs.layout import RunLayout


class RunDirBusy(InputError):
    """Another process holds the run directory."""


@contextlib.contextmanager
def removed_if_left_empty(root: Path) -> Iterator[None]:
    """A start that fails before writing anything leaves no empty directory behind (Hydra makes its output
    directory before the job runs). A start refused because another process holds the directory leaves it be:
    the holder may not have written into it yet."""
    try:
        yield
    except RunDirBusy:
        raise
    except BaseException:
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        raise


@contextlib.contextmanager
def holding(layout: RunLayout, lock: Path | None = None, shared: bool = False) -> Iterator[None]:
    """Hold the run directory for the block, or refuse at once (:class:`RunDirBusy`) naming its holder.

    ``lock``: the lock file (default the directory's own). ``shared``: readers (eval.py, the jobs of one
    CV run) may hold it together, never beside a run that writes it. A DDP rank other than 0 shares its
    rank 0's hold. The lock file goes as the last hold ends; a start refused before writing anything leaves
    no empty directory behind.
    """
    if rank_zero_only.rank != 0:
        yield
        return
    path = lock or layout.lock
    holder = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
    try:
        with held_lock(path, holder, shared, remove_after=not shared), removed_if_left_empty(layout.root):
            yield
    except LockHeld as held:
        raise RunDirBusy(f"{layout.root}: in use by {held.holder}; wait for it to end, or pick another "
                         "run_name=...") from None
    finally:
        if shared:  # the last of the shared holders removes it: taken alone for that, at once, or left
            with contextlib.suppress(LockHeld), held_lock(path, holder, remove_after=True):
                pass
