"""The errors the entry points turn into exit codes: bad user input (one line, exit 2), and a run
interrupted by a signal after saving its state (exit 128 + the signal)."""

from __future__ import annotations

import signal
from pathlib import Path


class InputError(ValueError):
    """A file, column or value the user handed in is unusable.

    The message names the file (or config key), the field and what to do about it, so that
    the command-line entry points can print it as one line instead of a traceback.
    """


def input_error_in(error: BaseException) -> InputError | None:
    """The InputError that ``error`` is or was raised from (Hydra wraps errors raised while it
    instantiates a config in its own exception), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, InputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class Interrupted(BaseException):
    """A command stopped by SIGTERM or Ctrl-C; the process exits 128 + the signal, saying ``then`` (what was kept,
    what to do next) in one line.

    A ``BaseException``, like ``KeyboardInterrupt``: a sweep ends here instead of recording a
    failed job and starting the next one.
    """

    def __init__(self, signum: int, then: str) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}: {then}")
        self.signum = signum

    @classmethod
    def resumable(cls, signum: int, checkpoint: Path) -> Interrupted:
        """A run stopped after saving ``checkpoint`` (``last.ckpt``, or a CV run's directory)."""
        return cls(signum, f"continue from {checkpoint} with resume=true")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
