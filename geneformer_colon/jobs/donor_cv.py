"""Cross-validation over donors: ``cv=lodo`` runs a job once per left-out test donor.

Each fold is a complete run directory, ``<run dir>/folds/<test donor>/``; with ``cv.seeds`` of two
or more, one a seed, ``<run dir>/folds/<test donor>/seed<k>/``. The parent holds the config and
the summary across folds (``report.cv_summary``). The validation donor of a fold is
``cv.val_donor`` when set (except in its own test fold), else the donor after the test donor in
``cv.donors`` (cyclic); ``cv.val_donors: N`` validates on the N donors after it (the worst of them
is ``val/worst_donor_macro_f1``). The training donors are all the others. A job holds the folds it
runs (and shares the parent with the other jobs of the run). ``cv.folds`` runs only some test
donors, so folds can be spread over several jobs and gathered: each job rewrites the summary from
every fold finished so far. With ``resume=true`` a finished fold (and seed) is skipped and an
interrupted one resumes. The job's value (a sweeper's objective) is, over the folds it covers, the
mean (``cv.objective=mean``) or the lowest (``worst``) of each fold's validation figure, a fold's
figure being its mean over seeds.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from pytorch_lightning.utilities.exceptions import SIGTERMException

from geneformer_colon.common.errors import InputError, Interrupted
from geneformer_colon.common.names import FINISHED, VAL
from geneformer_colon.jobs.train import check_recipe
from geneformer_colon.model.callbacks import SignalLatch
from geneformer_colon.report.cv_summary import across_folds_markdown, write_cv_summary
from geneformer_colon.report.history import write_history
from geneformer_colon.report.wandb_run import fold_group, report_cv_run
from geneformer_colon.runs.config import plain
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.lock import holding
from geneformer_colon.runs.reading import read_run
from geneformer_colon.runs.start import (
    accept_start,
    accepting_first,
    allowed_changes,
    finished,
    prepare_run_dir,
    record_changes,
)

log = logging.getLogger(__name__)

Task = Callable[[DictConfig], dict[str, Any]]


OBJECTIVES = {"mean": np.mean, "worst": np.min}


@dataclass(frozen=True)
class Fold:
    test_donor: str
    val_donors: tuple[str, ...]


def plan_folds(donors: Sequence[str], folds: Sequence[str] | None, val_donor: str | None, n_val: int = 1
               ) -> list[Fold]:
    """The folds to run: a test donor each (``folds``, default every donor), its validation donors by the rule."""
    donors = list(donors)
    if not (isinstance(n_val, int) and n_val >= 1):
        raise InputError(f"cv.val_donors is {n_val!r}; set it to the number of validation donors a fold has (>= 1)")
    if val_donor and n_val > 1:
        raise InputError(f"cv.val_donor={val_donor} and cv.val_donors={n_val}: a fixed validation donor is one donor; "
                         "set cv.val_donor=null to validate on the next donors")
    if len(donors) < n_val + 2:
        raise InputError(f"cv.donors: {donors}; leave-one-donor-out needs at least {n_val + 2} donors (test, "
                         f"{n_val} validation, training)")
    chosen = list(folds) if folds else donors
    unknown = sorted(set(chosen) - set(donors)) + ([val_donor] if val_donor and val_donor not in donors else [])
    if unknown:
        raise InputError(f"cv.folds / cv.val_donor name {unknown}, not among the donors of the folds {donors}; "
                         "choose from those (cv.donors sets them)")
    plan = []
    for test in chosen:
        following = tuple(donors[(donors.index(test) + step) % len(donors)] for step in range(1, n_val + 1))
        plan.append(Fold(test, (val_donor,) if val_donor and val_donor != test else following))
    return plan


def val_rule(val_donor: str | None, n_val: int = 1) -> str:
    if val_donor:
        return f"{val_donor}, and the next donor in cv.donors in {val_donor}'s own test fold"
    if n_val > 1:
        return f"the {n_val} next donors in cv.donors after the test donor (cyclic)"
    return "the next donor in cv.donors after the test donor (cyclic)"


def fold_seeds(cfg: DictConfig) -> list[int] | None:
    """``cv.seeds`` when it names two seeds or more (each fold then runs once a seed, in its own folder),
    else None (each fold runs once, with ``cv.seeds``' one seed or the config's ``seed``)."""
    given = cfg.cv.get("seeds")
    seeds = list(given if given is not None else [])
    if (given is not None and not seeds) or len(set(seeds)) != len(seeds) \
            or not all(isinstance(seed, int) and seed >= 0 for seed in seeds):
        raise InputError(f"cv.seeds is {seeds}; give distinct integers >= 0, e.g. [0,1,2] (or null: the seed)")
    return seeds if len(seeds) > 1 else None


def available_donors(cfg: DictConfig) -> list[str]:
    """The donors with cells of the kept labels and cell types, sorted."""
    datamodule = instantiate(cfg.data, tokenizer=plain(cfg.model.tokenizer), val_donors=[], test_donors=[])
    return datamodule.available_donors()


def fold_config(cfg: DictConfig, layout: RunLayout, fold: Fold, seed: int, seeded: bool) -> DictConfig:
    """The job's config for one fold and seed: its donors, seed, own run directory, run name and W&B run (job
    type ``fold``, in the group of its CV run's folds); resumed when ``resume=true`` found it interrupted (a
    fold never started starts afresh). Its ``cv`` node names the fold: ``test_donor``, ``val_donor`` (several
    joined by commas) and ``seed``."""
    fold_cfg = cfg.copy()
    with open_dict(fold_cfg):
        fold_cfg.data.val_donors = list(fold.val_donors)
        fold_cfg.data.test_donors = [fold.test_donor]
        fold_cfg.seed = seed
        fold_cfg.paths.run_dir = str(layout.root)
        fold_cfg.run_name = f"{cfg.run_name}/{fold.test_donor}" + (f"/seed{seed}" if seeded else "")
        fold_cfg.cv = {"strategy": "none", "test_donor": fold.test_donor, "val_donor": ",".join(fold.val_donors),
                       "seed": seed}
        fold_cfg.resume = bool(cfg.resume and layout.checkpoint("last").is_file())
        if fold_cfg.get("sweep", {}).get("pruner"):  # a CV trial's value is its folds' mean: no fold prunes it
            fold_cfg.sweep.pruner = "none"
        wandb = fold_cfg.get("logger", {}).get("wandb")
        if wandb is not None:
            wandb.group, wandb.job_type = fold_group(cfg), "fold"
    return fold_cfg


def check_parent(parent: RunLayout, cfg: DictConfig, layouts: Sequence[RunLayout]) -> bool:
    """Before any fold runs: the parent is no single run's directory; the folds already there were made
    with this recipe (the jobs of one CV run differ in ``cv.folds`` only); a fold that already holds a
    run is only taken up with resume=true or overwrite=true. Whether the parent holds a run of one split
    that ``overwrite=true`` replaces (once the start is accepted)."""
    replaced = not parent.folds.is_dir() and parent.holds_a_run()
    if replaced and not cfg.overwrite:
        raise InputError(f"{parent.root}: holds a run that is not cross-validated; pick another run_name=... "
                         "for the CV run, or replace it with overwrite=true")
    if parent.folds.is_dir() and parent.config.is_file() and not cfg.overwrite:
        record_changes(cfg, parent, allowed_changes(parent, cfg, ignore=("cv.folds",)))
    taken = [str(layout.root.relative_to(parent.folds)) for layout in layouts if layout.holds_a_run()]
    if taken and not (cfg.resume or cfg.overwrite):
        raise InputError(
            f"{parent.root}: folds {taken} already hold runs; continue with resume=true (finished folds are "
            "skipped), replace them with overwrite=true, pick other cv.folds, or another run_name=..."
        )
    return replaced


def run_folds(task: Task, cfg: DictConfig, metric: str = "macro_f1") -> float:
    """Every fold (and seed) of ``cv=lodo`` one after the other; the summary rewritten after each; the
    objective over the folds' val ``metric`` (each fold's mean over its seeds). The CV run's own files (config,
    ``.hydra/``, summary, W&B run) are written once the first fold to train has passed its checks; with
    ``resume=true`` and every fold finished, nothing is written."""
    check_recipe(cfg)
    objective = cfg.cv.get("objective", "mean")
    if objective not in OBJECTIVES:
        raise InputError(f"cv.objective is {objective!r}; use mean or worst")
    seeds = fold_seeds(cfg)
    parent = RunLayout(cfg.paths.run_dir)
    donors = list(cfg.cv.donors or available_donors(cfg))
    n_val = cfg.cv.get("val_donors", 1)
    folds = plan_folds(donors, cfg.cv.folds, cfg.cv.val_donor, n_val)
    log.info("cv=lodo: each fold sets its own data.val_donors and data.test_donors (the configured %s and %s are "
             "not used; cv.val_donor chooses a fixed validation donor): %s", list(cfg.data.val_donors or []),
             list(cfg.data.test_donors or []),
             "; ".join(f"test {fold.test_donor}, validation {', '.join(fold.val_donors)}" for fold in folds))
    one_seed = (cfg.cv.get("seeds") or [cfg.seed])[0]
    runs = [(fold, seed, parent.fold(fold.test_donor, seed if seeds else None))
            for fold in folds for seed in (seeds or [one_seed])]
    between_folds = SignalLatch("ending the CV job after this fold")
    with contextlib.ExitStack() as held:  # this job's folds: other jobs of the run may hold the others
        for fold in folds:
            held.enter_context(holding(parent.fold(fold.test_donor), parent.fold_lock(fold.test_donor)))
        replaced = check_parent(parent, cfg, [layout for _, _, layout in runs])
        if cfg.resume and not cfg.overwrite and all(finished(layout) for _, _, layout in runs):
            log.info("%s: every fold is finished; resume=true changes nothing", parent.root)
            return fold_objective(objective, [(fold, read_run(layout.root).metrics) for fold, _, layout in runs],
                                  metric)

        def accept() -> None:
            if replaced:
                prepare_run_dir(parent, overwrite=True)
            accept_start(parent, cfg)

        accepted = held.enter_context(accepting_first(accept))
        rule = val_rule(cfg.cv.val_donor, n_val)
        kind = "baseline" if "baseline" in cfg else "train"
        records = []
        cv: dict[str, Any] = {}
        between_folds.install()  # a fold's training has its own (LastCheckpoint); outside it, folds end whole
        held.callback(between_folds.restore)
        error = None
        try:
            for fold, seed, layout in runs:
                if between_folds.received is not None:
                    raise Interrupted.resumable(between_folds.received, parent.root)
                where = f"fold {fold.test_donor}" + (f", seed {seed}" if seeds else "")
                earlier = read_run(layout.root)
                if cfg.resume and earlier.status == FINISHED:
                    log.info("%s: finished earlier, skipped", where)
                    if not layout.history.is_file():  # a job stopped between its metrics and its history
                        write_history(earlier)
                    record = earlier.metrics
                else:
                    log.info("%s: validation donor %s", where, ", ".join(fold.val_donors))
                    record = task(fold_config(cfg, layout, fold, seed, seeds is not None))
                    if not cfg.cv.get("keep_last", False):  # a finished fold is not resumed: its best is what is used
                        layout.checkpoint("last").unlink(missing_ok=True)
                records.append((fold, record))
                if accepted:  # the folds skipped before the first that trained are in its summary
                    cv = write_cv_summary(parent, cfg.run_name, kind, donors, read_run(layout.root).class_names,
                                          rule, seeds)
        except BaseException as raised:
            error = raised
            raise
        finally:
            if accepted:
                report_cv_run(cfg, parent, read_run(parent.root).cv, error)
    write_history(read_run(parent.root))
    log.info("%s: %d of %d folds finished; across folds (%s):\n%s", cfg.run_name, len(cv["folds"]), len(donors),
             parent.cv_markdown, across_folds_markdown(cv))
    return fold_objective(objective, records, metric)


def fold_objective(objective: str, records: Sequence[tuple[Fold, dict[str, Any]]], metric: str) -> float:
    """``cv.objective`` over the folds' validation ``metric``, each fold's figure its mean over its seeds."""
    scores: dict[str, list[float]] = {}
    for fold, record in records:
        scores.setdefault(fold.test_donor, []).append(record[VAL][metric])
    return float(OBJECTIVES[objective]([np.mean(values) for values in scores.values()]))


def run(task: Task, cfg: DictConfig, metric: str = "macro_f1") -> float:
    """``task`` on the config's split (``cv=none``, or a config without cv) or on every fold (``cv=lodo``);
    the sweeper's objective: the validation ``metric`` (over folds: ``cv.objective``, their mean or worst)."""
    strategy = cfg.get("cv", {}).get("strategy", "none")
    if strategy not in ("none", "lodo"):
        raise InputError(f"cv.strategy is {strategy!r}; use cv=none or cv=lodo")
    layout = RunLayout(cfg.paths.run_dir)
    try:
        # the jobs of one CV run share its directory (each holds its own folds); a run of one split holds it alone
        with holding(layout, shared=strategy == "lodo"):
            return task(cfg)[VAL][metric] if strategy == "none" else run_folds(task, cfg, metric)
    except SIGTERMException:  # Lightning's, on SIGTERM while it evaluates: it would end the process silently, exit 0
        raise Interrupted.resumable(signal.SIGTERM, layout.root) from None
