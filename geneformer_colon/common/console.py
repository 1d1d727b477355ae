"""The console of every command: library noise kept off it, a bad input as one line, exit codes; the
run's log file, opened once its start is accepted."""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any

from pytorch_lightning.utilities import rank_zero_only

from geneformer_colon.common.cpus import use_threads
from geneformer_colon.common.errors import Interrupted, input_error_in

# Libraries whose info lines (device summaries, tips, seeds) are not news on a normal run.
QUIET_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning", "lightning.pytorch", "lightning.fabric",
                 "torch.distributed")


def quiet_libraries() -> None:
    """Keep library advertisements and deprecation notices off the console; their warnings stay."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # a resumed run's checkpoints/ holds last.ckpt and best.ckpt by design
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def report_input_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """A bad input: its message once on stderr, exit 2, no traceback (also when Hydra wrapped it).
    An interrupted run: exit 128 + the signal, so a scheduler requeues it. Torch's threads fit the CPUs
    the process may use."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet_libraries()
        try:
            use_threads()
            return main(*args, **kwargs)
        except Interrupted as interrupted:
            print(f"{interrupted}", file=sys.stderr)
            sys.exit(interrupted.exit_code)
        except Exception as error:
            bad_input = input_error_in(error)
            if bad_input is None:
                raise
            print(f"error: {bad_input}", file=sys.stderr)
            sys.exit(2)

    return wrapper


class RunLogFile(logging.FileHandler):
    """Hydra's log file of a job (conf/hydra/default.yaml), in the run directory: records wait in memory
    until the run's start is accepted (:func:`open_run_log`), so a refused start writes nothing there.
    A DDP rank other than 0 starts after its rank 0 accepted the run: it writes at once."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None) -> None:
        super().__init__(filename, mode, encoding, delay=True)
        self.waiting: list[logging.LogRecord] | None = [] if rank_zero_only.rank == 0 else None

    def emit(self, record: logging.LogRecord) -> None:
        if self.waiting is None:
            super().emit(record)
        else:
            self.waiting.append(record)

    def open(self) -> None:
        waiting, self.waiting = self.waiting or [], None
        for record in waiting:
            super().emit(record)


def open_run_log() -> None:
    """The start is accepted: the job's log file gets what was logged so far, and what follows."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLogFile):
            handler.open()
