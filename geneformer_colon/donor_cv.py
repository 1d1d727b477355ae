"""Cross-validation over donors: ``cv=lodo`` runs a job once per left-out test donor.

Each fold is a complete run directory, ``<run dir>/folds/<test donor>/``; the parent holds the
config and the summary across folds (``report.cv_summary``). The validation donor of a fold is
``cv.val_donor`` when set (except in its own test fold), else the donor after the test donor in
``cv.donors`` (cyclic); the training donors are all the others. ``cv.folds`` runs only some
test donors, so folds can be spread over several jobs and gathered: each job rewrites the
summary from every fold finished so far. With ``resume=true`` a finished fold is skipped and an
interrupted one resumes. The job's value (a sweeper's objective) is the mean validation macro F1
over the folds it covers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from geneformer_colon.config import check_values, plain
from geneformer_colon.errors import InputError
from geneformer_colon.names import FINISHED, VAL
from geneformer_colon.report.cv_summary import across_folds_markdown, write_cv_summary
from geneformer_colon.report.history import write_history
from geneformer_colon.rundir import RunLayout, allowed_changes, prepare_run_dir, read_run, record_changes, save_config
from geneformer_colon.sweep import in_multirun

log = logging.getLogger(__name__)

Task = Callable[[DictConfig], dict[str, Any]]


@dataclass(frozen=True)
class Fold:
    test_donor: str
    val_donor: str


def plan_folds(donors: Sequence[str], folds: Sequence[str] | None, val_donor: str | None) -> list[Fold]:
    """The folds to run: a test donor each (``folds``, default every donor), its validation donor by the rule."""
    donors = list(donors)
    if len(donors) < 3:
        raise InputError(f"cv.donors: {donors}; leave-one-donor-out needs at least three donors (test, validation, "
                         "training)")
    chosen = list(folds) if folds else donors
    unknown = sorted(set(chosen) - set(donors)) + ([val_donor] if val_donor and val_donor not in donors else [])
    if unknown:
        raise InputError(f"cv.folds / cv.val_donor name {unknown}, not among the donors of the folds {donors}; "
                         "choose from those (cv.donors sets them)")
    plan = []
    for test in chosen:
        following = donors[(donors.index(test) + 1) % len(donors)]
        plan.append(Fold(test, val_donor if val_donor and val_donor != test else following))
    return plan


def val_rule(val_donor: str | None) -> str:
    if val_donor:
        return f"{val_donor}, and the next donor in cv.donors in {val_donor}'s own test fold"
    return "the next donor in cv.donors after the test donor (cyclic)"


def available_donors(cfg: DictConfig) -> list[str]:
    """The donors with cells of the kept labels and cell types, sorted."""
    datamodule = instantiate(cfg.data, tokenizer=plain(cfg.model.tokenizer), val_donors=[], test_donors=[])
    return datamodule.available_donors()


def fold_config(cfg: DictConfig, parent: RunLayout, fold: Fold) -> DictConfig:
    """The job's config for one fold: its donors, its own run directory, run name and W&B group; resumed
    when ``resume=true`` found it interrupted (a fold never started starts afresh)."""
    fold_cfg = cfg.copy()
    layout = parent.fold(fold.test_donor)
    with open_dict(fold_cfg):
        fold_cfg.data.val_donors = [fold.val_donor]
        fold_cfg.data.test_donors = [fold.test_donor]
        fold_cfg.paths.run_dir = str(layout.root)
        fold_cfg.run_name = f"{cfg.run_name}/{fold.test_donor}"
        fold_cfg.cv = {"strategy": "none"}
        fold_cfg.resume = bool(cfg.resume and layout.checkpoint("last").is_file())
        wandb = fold_cfg.get("logger", {}).get("wandb")
        if wandb is not None and wandb.get("group") is None and not in_multirun():
            wandb.group = cfg.run_name
    return fold_cfg


def check_parent(parent: RunLayout, cfg: DictConfig, folds: Sequence[Fold]) -> None:
    """Before any fold runs: the parent is no single run's directory; the folds already there were made
    with this recipe (the jobs of one CV run differ in ``cv.folds`` only); a fold that already holds a
    run is only taken up with resume=true or overwrite=true."""
    if not parent.folds.is_dir() and parent.holds_a_run():
        if not cfg.overwrite:
            raise InputError(f"{parent.root}: holds a run that is not cross-validated; pick another run_name=... "
                             "for the CV run, or replace it with overwrite=true")
        prepare_run_dir(parent, overwrite=True)
    if parent.folds.is_dir() and parent.config.is_file() and not cfg.overwrite:
        record_changes(cfg, parent, allowed_changes(parent, cfg, ignore=("cv.folds",)))
    taken = [fold.test_donor for fold in folds if parent.fold(fold.test_donor).holds_a_run()]
    if taken and not (cfg.resume or cfg.overwrite):
        raise InputError(
            f"{parent.root}: folds {taken} already hold runs; continue with resume=true (finished folds are "
            "skipped), replace them with overwrite=true, pick other cv.folds, or another run_name=..."
        )


def run_folds(task: Task, cfg: DictConfig, metric: str = "macro_f1") -> float:
    """Every fold of ``cv=lodo`` one after the other; the summary rewritten after each; the mean val ``metric``."""
    check_values(cfg)
    parent = RunLayout(cfg.paths.run_dir)
    donors = list(cfg.cv.donors or available_donors(cfg))
    folds = plan_folds(donors, cfg.cv.folds, cfg.cv.val_donor)
    check_parent(parent, cfg, folds)
    save_config(parent, cfg)
    rule = val_rule(cfg.cv.val_donor)
    kind = "baseline" if "baseline" in cfg else "train"
    scores, cv = [], {}
    for fold in folds:
        earlier = read_run(parent.fold(fold.test_donor).root)
        if cfg.resume and earlier.status == FINISHED:
            log.info("fold %s: finished earlier, skipped", fold.test_donor)
            record = earlier.metrics
        else:
            log.info("fold %s: validation donor %s", fold.test_donor, fold.val_donor)
            record = task(fold_config(cfg, parent, fold))
        scores.append(record[VAL][metric])
        cv = write_cv_summary(parent, cfg.run_name, kind, donors, list(cfg.data.labels), rule)
    write_history(read_run(parent.root))
    log.info("%s: %d of %d folds finished; across folds (%s):\n%s", cfg.run_name, len(cv["folds"]), len(donors),
             parent.cv_markdown, across_folds_markdown(cv))
    return float(np.mean(scores))


def run(task: Task, cfg: DictConfig, metric: str = "macro_f1") -> float:
    """``task`` on the config's split (``cv=none``, or a config without cv) or on every fold (``cv=lodo``);
    the sweeper's objective: the validation ``metric`` (over folds: its mean)."""
    strategy = cfg.get("cv", {}).get("strategy", "none")
    if strategy == "none":
        return task(cfg)[VAL][metric]
    if strategy != "lodo":
        raise InputError(f"cv.strategy is {strategy!r}; use cv=none or cv=lodo")
    return run_folds(task, cfg, metric)
