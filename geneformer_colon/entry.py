"""How a Hydra job runs: in Hydra's output directory, over the folds of ``cv``, recorded in a sweep."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from geneformer_colon import donor_cv
from geneformer_colon.cpus import use_threads
from geneformer_colon.sweep import in_multirun, run_sweep_job


def run_job(task: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig, metric: str = "macro_f1") -> float:
    """Run ``task`` (over the folds of ``cv`` when set) in Hydra's output directory; return the
    sweeper's objective, the validation ``metric``. In a sweep a failing job is recorded, not fatal."""
    with open_dict(cfg):
        cfg.paths.run_dir = HydraConfig.get().runtime.output_dir
    if cfg.get("threads") is not None:
        use_threads(cfg.threads)
    job = functools.partial(donor_cv.run, task, metric=metric)
    if in_multirun():
        return run_sweep_job(job, cfg)
    return job(cfg)
