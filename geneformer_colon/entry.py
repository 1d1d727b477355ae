"""What the Hydra entry points share: the run directory, sweep jobs, one clear line for a bad input."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from geneformer_colon.errors import InputError
from geneformer_colon.sweep import in_multirun, run_sweep_job


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


def run_job(task: Callable[[DictConfig], float], cfg: DictConfig) -> float:
    """Run ``task`` in Hydra's output directory; in a sweep, a failing job is recorded, not fatal."""
    with open_dict(cfg):
        cfg.paths.run_dir = HydraConfig.get().runtime.output_dir
    if in_multirun():
        return run_sweep_job(task, cfg)
    return task(cfg)
