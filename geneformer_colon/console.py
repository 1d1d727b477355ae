"""The console of every command: library noise kept off it, a bad input as one line, exit codes."""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any

from geneformer_colon.cpus import use_threads
from geneformer_colon.errors import Interrupted, input_error_in

# Libraries whose info lines (device summaries, tips, seeds) are not news on a normal run.
QUIET_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning", "lightning.pytorch", "torch.distributed")


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
