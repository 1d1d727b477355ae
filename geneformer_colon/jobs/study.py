"""An Optuna study driven by Hydra (``sweep=optuna``): its search space in Hydra's sweep grammar, its
pruner, the trial a job reports to (the PruneHopelessTrial callback), and what the sweep's summary
says about the study.

The sweeper (``hydra_plugins/geneformer_colon_sweepers``) asks the study for trials, hands them to
Hydra's launcher as jobs (their sampled values, ``sweep.trial=<number>``; the job's number is the
trial's), and tells the study each job's outcome: its value, a failed trial for a failed job, a
pruned trial for a job its pruner stopped. The study lives in ``hydra.sweeper.storage`` (sqlite or
any database Optuna takes) or, when that is null, in ``<sweep dir>/optuna.db``: invocations with the
same storage and study name continue one study, one after another or at once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import pytorch_lightning as pl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep

from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import write_json
from geneformer_colon.jobs.sweep import STUDY_FILE
from geneformer_colon.runs.record import EPOCHS_FROM

log = logging.getLogger(__name__)

PRUNED_AT = "pruned_at_epoch"  # the trial's user attribute its pruning callback sets


def make_pruner(name: str, startup_trials: int = 5) -> optuna.pruners.BasePruner:
    """``median``: stop a trial whose epoch's value is below the median of earlier trials at that epoch
    (after ``startup_trials`` trials have run to their end); ``none``: never."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise InputError(f"sweep.pruner is {name!r}; set it to median or none")


def distribution(override: Override) -> optuna.distributions.BaseDistribution:
    """An Optuna distribution from a sweep override: ``interval(a, b)`` (``tag(log, ...)`` for a log
    scale), ``range(a, b, step)``, ``choice(...)`` or ``a,b,c``."""
    value = override.value()
    log = "log" in getattr(value, "tags", set())
    if isinstance(value, IntervalSweep):
        if isinstance(value.start, int) and isinstance(value.end, int):
            return optuna.distributions.IntDistribution(value.start, value.end, log=log)
        return optuna.distributions.FloatDistribution(value.start, value.end, log=log)
    if isinstance(value, RangeSweep):
        if all(isinstance(x, int) for x in (value.start, value.stop, value.step)):
            return optuna.distributions.IntDistribution(value.start, value.stop - value.step, step=value.step)
        return optuna.distributions.FloatDistribution(value.start, value.stop - value.step, step=value.step)
    if isinstance(value, ChoiceSweep):
        return optuna.distributions.CategoricalDistribution(list(value.list))
    raise InputError(f"hydra.sweeper.params: {override.input_line!r} is no search space; use interval(a, b), "
                     "tag(log, interval(a, b)), range(a, b, step), choice(a, b) or a,b")


def search_space(params: Mapping[str, str], arguments: Sequence[str]
                 ) -> tuple[dict[str, optuna.distributions.BaseDistribution], list[str]]:
    """The distributions to sample (``hydra.sweeper.params`` and sweep overrides on the command line)
    and the fixed overrides of every trial."""
    parser = OverridesParser.create()
    overrides = parser.parse_overrides([f"{key}={value}" for key, value in params.items()])
    overrides += parser.parse_overrides(list(arguments))
    space = {o.get_key_element(): distribution(o) for o in overrides if o.is_sweep_override()}
    fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
    return space, fixed


def recipe_overrides(trial: optuna.trial.BaseTrial, fixed: Sequence[str]) -> list[str]:
    """A trial's recipe: the fixed overrides and its sampled values."""
    return [*fixed, *(f"{name}={value}" for name, value in trial.params.items())]


def job_overrides(trial: optuna.trial.BaseTrial, fixed: Sequence[str], study: str, storage: str) -> list[str]:
    """A trial's job: its recipe, and the study, its storage and the trial's number (what its pruning
    callback reports to; its W&B group)."""
    return [*recipe_overrides(trial, fixed), f"sweep.study='{study}'", f"sweep.storage='{storage}'",
            f"sweep.trial={trial.number}"]


def job_trial(study_name: str, storage: str, number: int, pruner: str, startup_trials: int) -> optuna.trial.Trial:
    """The running trial ``number`` of the study, as the job that runs it reports to it."""
    study = optuna.load_study(study_name=study_name, storage=storage,
                              pruner=make_pruner(pruner, startup_trials))
    # Optuna asks for trials in the process that runs them; here the sweeper asked, so the job
    # takes the trial up by its id (what Study.ask does with the id it creates).
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    return optuna.trial.Trial(study, trial_id)


def outcome(study: optuna.Study, number: int, value: Any) -> tuple[optuna.trial.TrialState, float | None]:
    """What to tell the study of a job's trial: pruned (its callback said so), failed (no finite value:
    the job failed), or complete with its value."""
    # read from the storage: the job wrote to it (a Trial object's own attributes may be a stale cache)
    if PRUNED_AT in study.get_trials(deepcopy=False)[number].user_attrs:
        return optuna.trial.TrialState.PRUNED, None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return optuna.trial.TrialState.FAIL, None
    return optuna.trial.TrialState.COMPLETE, float(value)


def save_study(sweep_dir: Path, study: optuna.Study, storage: str) -> dict[str, Any]:
    """``study.json`` in the sweep root: the study's name, storage, trials by state and its best trial
    across every invocation (number, value, values chosen, run directory)."""
    trials = study.get_trials(deepcopy=False)
    states = [trial.state.name.lower() for trial in trials]
    complete = [trial for trial in trials if trial.state == optuna.trial.TrialState.COMPLETE]
    best = study.best_trial if complete else None
    content = {
        "study": study.study_name, "storage": storage, "direction": study.direction.name.lower(),
        "trials": {state: states.count(state) for state in dict.fromkeys(states)},
        "best": None if best is None else {"trial": best.number, "value": best.value, "params": best.params,
                                           "run_dir": best.user_attrs.get("run_dir"),
                                           "overrides": best.user_attrs.get("overrides", [])},
    }
    write_json(sweep_dir / STUDY_FILE, content)
    return content


class PruneHopelessTrial(pl.Callback):
    """``sweep=optuna``: after each validation epoch, report ``monitor`` to the job's Optuna trial; when the
    study's pruner (``sweep.pruner``) finds the trial hopeless, stop training as early stopping does and
    mark the trial pruned. The run then ends as any run (its best epoch tested); the sweeper tells the
    study the trial was pruned. Nothing happens outside a trial or with ``pruner: none``."""

    def __init__(self, study: str | None, storage: str | None, trial: int | None, pruner: str,
                 startup_trials: int, monitor: str) -> None:
        self.monitor = monitor
        self.trial = None if trial is None or pruner == "none" else job_trial(study, storage, trial, pruner,
                                                                              startup_trials)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.trial is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        epoch = trainer.current_epoch + EPOCHS_FROM  # the trial's steps are the epochs a user reads
        hopeless = False
        if trainer.is_global_zero:
            self.trial.report(float(trainer.callback_metrics[self.monitor]), epoch)
            hopeless = self.trial.should_prune()
            if hopeless:
                self.trial.set_user_attr(PRUNED_AT, epoch)
                log.info("trial %d pruned after epoch %d: %s below the study's median", self.trial.number, epoch,
                         self.monitor)
        if trainer.strategy.broadcast(hopeless):
            trainer.should_stop = True
