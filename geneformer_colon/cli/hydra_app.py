"""A Hydra app of the package: ``hydra.main`` on the package's ``conf/`` with the command line checked first
(:func:`hydra_entry`), and a job run in Hydra's output directory, over the folds of ``cv``, recorded in a
sweep (:func:`run_job`)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from geneformer_colon.cli.override_checks import check_command_line
from geneformer_colon.common.cpus import use_threads
from geneformer_colon.common.errors import InputError
from geneformer_colon.jobs import donor_cv
from geneformer_colon.jobs.sweep import in_multirun, run_sweep_job
from geneformer_colon.runs.config import CONF_DIR
from geneformer_colon.runs.lock import removed_if_left_empty


def run_job(task: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig, metric: str = "macro_f1") -> float:
    """Run ``task`` (over the folds of ``cv`` when set) in Hydra's output directory; return the
    sweeper's objective, the validation ``metric``. In a sweep a failing job is recorded, not fatal."""
    with open_dict(cfg):
        cfg.paths.run_dir = HydraConfig.get().runtime.output_dir
    job = functools.partial(donor_cv.run, task, metric=metric)
    with removed_if_left_empty(Path(cfg.paths.run_dir)):  # a bad value here leaves no folder Hydra made
        if cfg.get("threads") is not None:
            use_threads(cfg.threads)
        if in_multirun():
            return run_sweep_job(job, cfg)
        return job(cfg)


def hydra_entry(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """``hydra.main`` for the package's ``conf/``, its command line checked first."""

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        run = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(task)

        @functools.wraps(task)
        def main() -> Any:
            try:
                check_command_line(CONF_DIR, config_name, sys.argv[1:])
            except InputError as error:
                print(f"error: {error}", file=sys.stderr)
                sys.exit(2)
            return run()

        return main

    return decorate
