"""One training run, start to finish: fit, pick the best epoch, test it, write the run directory."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from geneformer_colon.assembly.builders import (
    build_datamodule,
    build_module,
    build_trainer,
    start_from,
)
from geneformer_colon.assembly.scoring import score_split
from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.assembly.trust import RunTrust, check_calibration, head_logits, sample_rows, trust_settings
from geneformer_colon.common.errors import InputError
from geneformer_colon.common.names import EVAL_SPLITS, FINISHED, MONITOR, RUNNING, SPLITS, TRAIN, VAL, WORST_DONOR
from geneformer_colon.data.datamodule import CellDataModule
from geneformer_colon.model.adaptation import check_adaptation
from geneformer_colon.model.callbacks import BestCheckpoint, LastCheckpoint, RecordEpochs
from geneformer_colon.model.masked_genes import MaskingRates
from geneformer_colon.model.module import CellClassifier
from geneformer_colon.model.robust import PlainTraining
from geneformer_colon.report.history import write_history
from geneformer_colon.report.summary import print_summary
from geneformer_colon.report.wandb_run import (
    describe_logger_runs,
    finishing_wandb_run,
    flat_config,
    report_run,
)
from geneformer_colon.runs.config import check_values, instantiate_trusted, plain
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.reading import Run
from geneformer_colon.runs.record import best_epoch, check_success, run_record, write_loss_plot, write_metrics
from geneformer_colon.runs.start import accept_start, prepare_run_dir, recipe, record_changes, resume_point

log = logging.getLogger(__name__)

PLAIN_TRAINING = f"{PlainTraining.__module__}.{PlainTraining.__qualname__}"


@contextlib.contextmanager
def unlogged(trainer: pl.Trainer) -> Iterator[None]:
    """Evaluate without the loggers: a checkpoint re-evaluated after training is no new point on the
    epoch curves (its figures go to the run's summary)."""
    loggers = trainer.loggers
    trainer.loggers = []
    try:
        yield
    finally:
        trainer.loggers = loggers


def evaluate_best(trainer: pl.Trainer, module: CellClassifier, datamodule: CellDataModule, best_path: str | None,
                  layout: RunLayout, run_name: str, calibration: Mapping[str, Any] | None = None
                  ) -> dict[str, dict[str, Any]]:
    """The best checkpoint on the val and test donors, with the ``calibration`` fitted on the val donors' cells
    (``calibration.json``): each split's files and metrics.json entry."""
    results = {}
    module.keep_embeddings = True  # the kNN and energy scores of each cell
    for split, evaluate in zip(EVAL_SPLITS, (trainer.validate, trainer.test)):
        with unlogged(trainer):
            evaluate(module, datamodule=datamodule, ckpt_path=best_path or None, weights_only=True, verbose=False)
        results[split] = module.results[split]
    trust = fit_trust(calibration, module, datamodule, results[VAL], trainer.strategy.root_device)
    final = {}
    for split, result in results.items():
        # under DDP every rank holds the gathered results: one writes them
        final[split] = score_split(layout, split, datamodule.store.cells.iloc[result["index"]], result["targets"],
                                   result["probabilities"], module.class_names, run_name,
                                   (result["metrics"], result["confusion_matrix"]), write=trainer.is_global_zero,
                                   trust=trust, logits=head_logits(module.head, result["embeddings"]),
                                   embeddings=result["embeddings"])
    if trainer.is_global_zero:
        trust.save(layout.root)
    return final


def fit_trust(calibration: Mapping[str, Any] | None, module: CellClassifier, datamodule: CellDataModule,
              val: Mapping[str, Any], device: torch.device) -> RunTrust:
    """The run's calibration fitted on the validation cells' results, with a sample of the training cells'
    embeddings (through the one inference path, on the trainer's ``device``: evaluation's end left the module on
    the CPU; batched by ``data.max_tokens`` where set) for the kNN score."""
    settings = trust_settings(calibration)
    positions = datamodule.splits[TRAIN].positions
    rows = positions[sample_rows(len(positions), settings["knn_reference_cells"], datamodule.seed)]
    model = TrainedClassifier(module, datamodule.dictionaries, datamodule.settings, {})
    reference = model.apply(datamodule.store, rows, batch_size=datamodule.eval_batch_size,
                            max_tokens=datamodule.max_tokens, device=device)[1]
    return RunTrust.fit(settings, val["probabilities"], val["targets"], head_logits(module.head, val["embeddings"]),
                        val["embeddings"], reference, datamodule.split_donors(VAL))


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
    check_recipe(cfg)
    resume_from, changes = resume_point(layout, cfg) if cfg.resume else (None, {})
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg, labelled=kind != "pretrain")
    check_split(cfg, datamodule)
    module = make_module(cfg, datamodule, resume_from is None)
    donors = {split: datamodule.split_donors(split) for split in SPLITS if len(datamodule.splits[split])}
    cells = {split: len(datamodule.splits[split]) for split in donors}

    def record(status: str, epochs: list[dict[str, Any]], **final: Any) -> dict[str, Any]:
        return run_record(cfg.run_name, kind, status, donors, cells, epochs, init_from=cfg.get("init_from"),
                          recipe=recipe(), data=datamodule.source.provenance(), **final)

    if rank_zero_only.rank == 0:  # DDP: the first process writes the run directory
        if resume_from is None:
            prepare_run_dir(layout, cfg.overwrite)
        record_changes(cfg, layout, changes)
        accept_start(layout, cfg)
        datamodule.save_dictionaries(layout.dictionaries)
    trainer = build_trainer(cfg, [LastCheckpoint(layout.checkpoint("last")),
                                  RecordEpochs(lambda epochs: write_metrics(layout, record(RUNNING, epochs)))])
    describe_logger_runs(trainer.loggers, cfg, layout, kind)  # W&B: its job type, notes, config.yaml, epoch axis
    for logger in trainer.loggers:  # flat keys (loss.focal_gamma, ...) that W&B's run table filters by
        logger.log_hyperparams(flat_config(cfg))
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    if trainer.is_global_zero:
        write_loss_plot(layout, module.epoch_history, cfg.run_name)
    best = next((c for c in trainer.callbacks if isinstance(c, BestCheckpoint)), None)
    # the epochs now: evaluating the best checkpoint later reloads its shorter history
    return FittedRun(layout, trainer, module, datamodule, list(module.epoch_history),
                     best.best_model_path if best is not None else "", record)


def check_recipe(cfg: DictConfig) -> None:
    """Every value of the recipe that can be checked without data, before any data is generated, read or
    tokenized: the known ranges (``runs.config.check_values``), and the parts built from the config alone
    (``augment``, ``loss`` where ``data.labels`` names the classes, ``robust``, ``pretrain.masking``) built once."""
    check_values(cfg)
    check_adaptation(cfg)
    check_run_calibration(cfg)
    labels = cfg.data.get("labels")
    parts = {"augment": {}, "robust": {"donors": ["a", "b"], "hidden_size": 2},
             "loss": {"class_names": list(labels)} if labels else None}
    for key, arguments in parts.items():
        if cfg.get(key) is not None and arguments is not None:
            instantiate_trusted(cfg[key], key, **arguments)
    if cfg.get("pretrain") is not None:
        MaskingRates(**plain(cfg.pretrain.masking))


def check_run_calibration(cfg: DictConfig) -> None:
    """``calibration`` and a validation donor to fit it on (a training run's or a baseline's)."""
    cv = cfg.get("cv") or {}
    # under cv=lodo each fold names its own validation donors (cv.val_donors of them), whatever data.val_donors says
    val_donors = ([f"fold's validation donor {k}" for k in range(int(cv.get("val_donors", 1)))]
                  if cv.get("strategy") == "lodo" else cfg.data.get("val_donors"))
    check_calibration(cfg.get("calibration"), val_donors)


def check_split(cfg: DictConfig, datamodule: CellDataModule) -> None:
    """What the donors of the split must allow: a checkpoint or early stopping that selects by the worst validation
    donor needs two of them; a donor-robust strategy, two training donors."""
    for name in ("model_checkpoint", "early_stopping"):
        monitor = (cfg.callbacks.get(name) or {}).get("monitor")
        if monitor == WORST_DONOR and len(datamodule.split_donors(VAL)) < 2:
            raise InputError(f"callbacks.{name}.monitor is {monitor}, but the validation split has one donor "
                             f"({datamodule.split_donors(VAL)}); give data.val_donors two or more donors "
                             "(cv.val_donors in cv=lodo) or monitor val/macro_f1")
    robust, train_donors = cfg.get("robust"), datamodule.split_donors(TRAIN)
    if robust is not None and robust.get("_target_") != PLAIN_TRAINING and len(train_donors) < 2:
        raise InputError(f"robust: {robust.get('_target_')} acts across training donors, but the split trains on "
                         f"{train_donors or 'none'}; give two training donors or more (fewer data.val_donors or "
                         "data.test_donors, or more cv.donors), or robust=none")


def classifier_for(cfg: DictConfig, datamodule: CellDataModule, fresh: bool) -> CellClassifier:
    module = build_module(cfg, datamodule)
    if cfg.init_from and fresh:
        log.info("starting from the weights of %s", start_from(module, cfg.init_from, cfg.model.reinit_head))
    return module


@finishing_wandb_run
def train(cfg: DictConfig, make_module: Callable[[DictConfig, CellDataModule, bool], CellClassifier] = classifier_for,
          adapt: Callable[[FittedRun], str] | None = None) -> dict[str, Any]:
    """Train, test the best checkpoint, write every file of the run; return its metrics.json record. ``make_module``
    builds the classifier (as ``fit_run``'s); ``adapt(run)``, after fitting, adapts the best model and gives the
    checkpoint to test instead (``jobs/adapt.py``)."""
    run = fit_run(cfg, "train", make_module)
    best_path = adapt(run) if adapt is not None else run.best_path
    final = evaluate_best(run.trainer, run.module, run.datamodule, best_path, run.layout, cfg.run_name,
                          cfg.get("calibration"))
    selection = cfg.callbacks.get("model_checkpoint") or {}
    chosen = best_epoch(run.epochs, selection.get("monitor", MONITOR), selection.get("mode", "max"))
    summary = run.record(FINISHED, run.epochs, final=final, best_epoch=chosen,
                         best_checkpoint=run.best_checkpoint, success=check_success(cfg.success_criteria, final))
    if run.trainer.is_global_zero:
        summary = write_metrics(run.layout, summary)
        report_run(run.trainer.loggers, summary, run.module.class_names, run.layout)
        write_history(Run(run.layout.root, summary, OmegaConf.to_container(cfg, resolve=True), {}))
        print_summary(summary, run.module.class_names, run.layout.root)
    return summary
