"""What the Hydra entry points share: logging set-up and one clear line for a bad input."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

from geneformer_colon.errors import InputError


def report_input_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Print an :class:`InputError` as one line and exit 2, instead of a traceback."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except InputError as error:
            logging.getLogger("geneformer_colon").error("%s", error)
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper
