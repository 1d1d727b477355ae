"""One training run, start to finish: fit, pick the best epoch, test it, write the run directory."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities import rank_zero_only

from geneformer_colon.builders import (
    build_datamodule,
    build_module,
    build_trainer,
    plain,
    read_checkpoint,
    start_from,
)
from geneformer_colon.callbacks import BestCheckpoint, LastCheckpoint, RecordEpochs
from geneformer_colon.config import check_values, recipe_changes
from geneformer_colon.data.datamodule import CellDataModule
from geneformer_colon.errors import InputError
from geneformer_colon.io import remove
from geneformer_colon.model.module import CellClassifier
from geneformer_colon.report.history import write_history
from geneformer_colon.report.summary import print_summary
from geneformer_colon.report.wandb_run import (
    finishing_wandb_run,
    flat_config,
    report_run,
)
from geneformer_colon.rundir import (
    EVAL_SPLITS,
    FINISHED,
    RUNNING,
    SPLITS,
    Run,
    RunLayout,
    best_epoch,
    check_success,
    prediction_table,
    read_config,
    run_record,
    save_config,
    split_entry,
    write_metrics,
    write_split,
)

log = logging.getLogger(__name__)


def recipe() -> dict[str, Any]:
    """The command line as typed (overrides and config groups chosen), when running as a Hydra app."""
    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    return {"overrides": list(hydra_cfg.overrides.task), "choices": {
        group: choice for group, choice in hydra_cfg.runtime.choices.items()
        if not group.startswith("hydra") and choice is not None}}


def prepare_run_dir(layout: RunLayout, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory; clear what a start that failed before training left."""
    if rank_zero_only.rank != 0:  # a DDP rank: its rank 0 has checked (and maybe cleared) the directory
        return
    written = layout.written()
    if written and layout.holds_a_run() and not overwrite:
        raise InputError(
            f"{layout.root}: already holds a run ({', '.join(path.name for path in written)}); continue it with "
            "resume=true, replace it with overwrite=true, or pick another run_name=..."
        )
    if written and not layout.holds_a_run():
        log.info("%s: clearing what a start that failed before training left", layout.root)
    for path in written:
        remove(path)


def allowed_changes(layout: RunLayout, cfg: DictConfig, ignore: tuple[str, ...] = ()) -> dict[str, tuple[str, str]]:
    """How ``cfg``'s recipe differs from the one the run directory's config.yaml records; refused unless
    ``allow_resume_changes=true``."""
    changes = recipe_changes(read_config(layout.config), plain(cfg), ignore)
    if changes and not cfg.allow_resume_changes:
        listed = "; ".join(f"{key}: {was} -> {now}" for key, (was, now) in changes.items())
        raise InputError(
            f"{layout.config}: another recipe than the run's ({listed}); go on with the run's own settings, or "
            "add allow_resume_changes=true to go on with the new ones (config.yaml then records both)"
        )
    return changes


def resume_point(layout: RunLayout, cfg: DictConfig) -> tuple[Path, dict[str, tuple[str, str]]]:
    """The checkpoint ``resume=true`` goes on from, and the recipe changes it was allowed to make."""
    last = layout.checkpoint("last")
    if not last.is_file():
        raise InputError(f"{layout.root}: resume=true but there is no checkpoints/last.ckpt to continue from; "
                         "start it without resume=true")
    read_checkpoint(last)
    return last, allowed_changes(layout, cfg)


def record_changes(cfg: DictConfig, layout: RunLayout, changes: dict[str, tuple[str, str]]) -> None:
    """On a resume allowed to change the recipe: config.yaml keeps each resume's changes (before, after)."""
    earlier = read_config(layout.config).get("resume_changes") or []
    with open_dict(cfg):
        cfg.resume_changes = [*earlier, {key: list(values) for key, values in changes.items()}] if changes else earlier


def evaluate_best(trainer: pl.Trainer, module: CellClassifier, datamodule: CellDataModule, best_path: str | None,
                  layout: RunLayout, run_name: str) -> dict[str, dict[str, Any]]:
    """The best checkpoint on the val and test donors: each split's files and metrics.json entry."""
    final = {}
    for split, evaluate in zip(EVAL_SPLITS, (trainer.validate, trainer.test)):
        evaluate(module, datamodule=datamodule, ckpt_path=best_path or None, weights_only=True, verbose=False)
        result = module.results[split]
        table = prediction_table(datamodule.store.cells.iloc[result["index"]], result["targets"],
                                 result["probabilities"], module.class_names)
        final[split] = split_entry(table, result["metrics"], result["confusion_matrix"], module.class_names)
        if trainer.is_global_zero:  # under DDP every rank holds the gathered results: one writes them
            write_split(layout, split, table, result["confusion_matrix"], module.class_names, run_name)
    return final


@dataclass
class FittedRun:
    """What fitting left: the run's files' layout, the trainer and module (its last state), the data,
    every epoch's validation metrics, the best checkpoint, and how to build its metrics.json record."""

    layout: RunLayout
    trainer: pl.Trainer
    module: pl.LightningModule
    datamodule: CellDataModule
    epochs: list[dict[str, Any]]
    best_path: str
    record: Callable[..., dict[str, Any]]

    @property
    def best_checkpoint(self) -> str | None:
        return os.path.relpath(self.best_path, self.layout.root) if self.best_path else None


def fit_run(cfg: DictConfig, kind: str, make_module: Callable[[DictConfig, CellDataModule, bool], pl.LightningModule]
            ) -> FittedRun:
    """What every training run does: check everything that can be checked (values, data, model, a resume's
    checkpoint and recipe) before writing anything, prepare the run directory, and fit with the run's
    checkpoints and records. ``make_module(cfg, datamodule, fresh)``: ``fresh`` unless resuming."""
    layout = RunLayout(cfg.paths.run_dir)
    check_values(cfg)
    resume_from, changes = resume_point(layout, cfg) if cfg.resume else (None, {})
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    module = make_module(cfg, datamodule, resume_from is None)
    donors = {split: datamodule.split_donors(split) for split in SPLITS if len(datamodule.splits[split])}
    cells = {split: len(datamodule.splits[split]) for split in donors}

    def record(status: str, epochs: list[dict[str, Any]], **final: Any) -> dict[str, Any]:
        return run_record(cfg.run_name, kind, status, donors, cells, epochs, init_from=cfg.get("init_from"),
                          recipe=recipe(), **final)

    if rank_zero_only.rank == 0:  # DDP: the first process writes the run directory
        if resume_from is None:
            prepare_run_dir(layout, cfg.overwrite)
        record_changes(cfg, layout, changes)
        save_config(layout, cfg)
        datamodule.save_dictionaries(layout.dictionaries)
    trainer = build_trainer(cfg, [LastCheckpoint(layout.checkpoint("last")),
                                  RecordEpochs(lambda epochs: write_metrics(layout, record(RUNNING, epochs)))])
    for logger in trainer.loggers:  # flat keys (loss.focal_gamma, ...) that W&B's run table filters by
        logger.log_hyperparams(flat_config(cfg))
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    best = next((c for c in trainer.callbacks if isinstance(c, BestCheckpoint)), None)
    # the epochs now: evaluating the best checkpoint later reloads its shorter history
    return FittedRun(layout, trainer, module, datamodule, list(module.epoch_history),
                     best.best_model_path if best is not None else "", record)


def classifier_for(cfg: DictConfig, datamodule: CellDataModule, fresh: bool) -> CellClassifier:
    module = build_module(cfg, datamodule)
    if cfg.init_from and fresh:
        log.info("starting from the weights of %s", start_from(module, cfg.init_from, cfg.model.reinit_head))
    return module


@finishing_wandb_run()
def train(cfg: DictConfig) -> dict[str, Any]:
    """Train, test the best checkpoint, write every file of the run; return its metrics.json record."""
    run = fit_run(cfg, "train", classifier_for)
    final = evaluate_best(run.trainer, run.module, run.datamodule, run.best_path, run.layout, cfg.run_name)
    summary = run.record(FINISHED, run.epochs, final=final, best_epoch=best_epoch(run.epochs),
                         best_checkpoint=run.best_checkpoint, success=check_success(cfg.success_criteria, final))
    if run.trainer.is_global_zero:
        summary = write_metrics(run.layout, summary)
        report_run(run.trainer.loggers, summary, run.module.class_names, run.layout)
        write_history(Run(run.layout.root, summary, OmegaConf.to_container(cfg, resolve=True), {}))
        print_summary(summary, run.module.class_names, run.layout.root)
    return summary
