"""``hydra/sweeper=optuna``: an Optuna study (current Optuna) run through Hydra's launcher, one job a trial.

The released hydra-optuna-sweeper pins optuna<3; this one is small and leaves the study to
``geneformer_colon.jobs.study``. Trials are asked ``n_jobs`` at a time and handed to the launcher together
(the basic launcher runs them one after another, submitit as SLURM jobs at once); each job's number
is its trial's number, so the jobs of several invocations of one study never share a number.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from geneformer_colon.jobs import study as studies

log = logging.getLogger(__name__)


class OptunaSweeper(Sweeper):
    def __init__(self, direction: str, study_name: str, storage: str | None, n_trials: int, n_jobs: int,
                 sampler: optuna.samplers.BaseSampler, params: DictConfig | None = None) -> None:
        """The settings of conf/hydra/sweeper/optuna.yaml (Hydra has made ``sampler`` from its config)."""
        self.direction, self.study_name, self.storage = direction, study_name, storage
        self.n_trials, self.n_jobs = n_trials, max(1, n_jobs)
        self.sampler = sampler
        self.params = OmegaConf.to_container(params, resolve=True) if params else {}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)
        self.sweep_dir = Path(config.hydra.sweep.dir)

    def sweep(self, arguments: list[str]) -> None:
        settings = self.config.get("sweep") or {}
        space, fixed = studies.search_space(self.params, arguments)
        storage = self.storage or f"sqlite:///{(self.sweep_dir / 'optuna.db').resolve()}"
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(
            study_name=self.study_name, storage=storage, direction=self.direction, load_if_exists=True,
            sampler=self.sampler,
            pruner=studies.make_pruner(settings.get("pruner", "none"), settings.get("startup_trials", 5)))
        log.info("Optuna study %s in %s: %d trials, %d at a time", self.study_name, storage, self.n_trials,
                 self.n_jobs)
        asked = 0
        while asked < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - asked))]
            asked += len(trials)
            self.run_trials(study, trials, fixed, storage)
            studies.save_study(self.sweep_dir, study, storage)

    def run_trials(self, study: optuna.Study, trials: Sequence[optuna.trial.Trial], fixed: list[str],
                   storage: str) -> None:
        """Launch the trials' jobs (numbered as the trials; a run of consecutive numbers at once) and tell
        the study how each ended."""
        start = 0
        while start < len(trials):
            end = start + 1
            while end < len(trials) and trials[end].number == trials[end - 1].number + 1:
                end += 1
            batch = trials[start:end]
            overrides = [studies.job_overrides(trial, fixed, study.study_name, storage) for trial in batch]
            returns = self.launcher.launch(overrides, initial_job_idx=batch[0].number)
            for trial, job in zip(batch, returns):
                self.tell(study, trial, studies.recipe_overrides(trial, fixed), job)
            start = end

    @staticmethod
    def tell(study: optuna.Study, trial: optuna.trial.Trial, recipe: list[str], job: Any) -> None:
        """Tell the study how the trial's job ended; keep its recipe and run directory with the trial."""
        try:
            value = job.return_value
        except Exception:  # the job raised past the project's own failure handling
            value = None
        trial.set_user_attr("overrides", recipe)
        if job.hydra_cfg is not None:
            trial.set_user_attr("run_dir", job.hydra_cfg.hydra.runtime.output_dir)
        state, value = studies.outcome(study, trial.number, value)
        study.tell(trial, value, state=state)
        log.info("trial %d: %s%s", trial.number, state.name.lower(), "" if value is None else f", {value:.4f}")
