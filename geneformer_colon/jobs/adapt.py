"""A training run that adapts to its target donors' unlabelled cells (``adapt=mlm|self_training|dann|tent``; the
methods are in ``model/adaptation.py``); ``adapt=none`` is :func:`~geneformer_colon.jobs.train.train` itself.

The target cells reach each method as :class:`~geneformer_colon.data.unlabelled.UnlabelledCells` (no label
column); the model is selected on the validation donors' labels as in any run.

- ``mlm``: ``jobs/pretrain.py``'s masked-gene pretraining on the training and target donors' cells alone (no label
  read), cached per fold in ``<paths.cache_dir>/adapt-mlm/<key of its settings>`` (the seeds of a fold share
  it; on one device, so that a DDP fine-tuning's processes start after it), then the run fine-tunes from it.
- ``dann``: the classifier's ``robust`` strategy wrapped in a :class:`~geneformer_colon.model.adaptation.
  TargetAdversary` (saved with the checkpoint), the target cells attached before training.
- ``self_training`` and ``tent`` act after fitting, on the best epoch's model: its checkpoint is kept as
  ``checkpoints/fitted.ckpt`` and the adapted model replaces ``checkpoints/best.ckpt`` (what ``eval.py``,
  ``predict`` and ``export`` load), so a run resumed after an interruption adapts again from the same model, and
  one resumed to train more epochs adapts its newer best epoch (:func:`keep_fitted`). What the adaptation did
  goes to ``adaptation.json`` and the checkpoint's ``adaptation`` entry.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from geneformer_colon.assembly.builders import build_trainer, read_checkpoint
from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.common.caches import checked_cache
from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import atomic_path, text_fingerprint, write_json
from geneformer_colon.common.names import MONITOR, TEST, TRAIN, VAL
from geneformer_colon.data.datamodule import CellDataModule, TokenDataset
from geneformer_colon.data.dictionaries import MEDIAN_FILE, TOKEN_FILE
from geneformer_colon.data.unlabelled import UnlabelledCells
from geneformer_colon.jobs.pretrain import pretrain
from geneformer_colon.jobs.train import FittedRun, classifier_for, train
from geneformer_colon.model.adaptation import (
    AdaptSettings,
    PseudoLabelRound,
    check_adaptation,
    entropy_minimisation,
    self_train,
    target_adversary_node,
)
from geneformer_colon.model.module import CellClassifier
from geneformer_colon.runs.config import flatten, is_location_key, plain

log = logging.getLogger(__name__)

PRETRAINED_BERT = "geneformer_colon.model.backbone.pretrained_bert"
FITTED = "fitted"  # checkpoints/fitted.ckpt: the best epoch's model before self_training or tent
ADAPTATION_KEY = "adaptation"  # an adapted best.ckpt's entry: what the adaptation did (as adaptation.json)


def train_adapted(cfg: DictConfig) -> dict[str, Any]:
    """Train with the ``adapt`` method of the config (a task of ``donor_cv.run``: a fold's targets are its own)."""
    settings = check_adaptation(cfg)
    if not settings.active:
        return train(cfg)
    targets = settings.target_donors(list(cfg.data.val_donors or []), list(cfg.data.test_donors or []))
    log.info("adapt=%s: target donors %s (their cells without labels)", settings.name, ", ".join(targets))
    if settings.name == "mlm":
        return train(fine_tuning_config(cfg, pretrained_for(cfg, settings, targets)))
    if settings.name == "dann":
        return train(cfg, make_module=functools.partial(adversarial_classifier, settings=settings, targets=targets))
    return train(cfg, make_module=functools.partial(classifier_with_targets, targets=targets),
                 adapt=functools.partial(adapt_fitted, cfg, settings, targets))


def target_cells(datamodule: CellDataModule, targets: list[str]) -> UnlabelledCells:
    """The target donors' cells of the validation and test splits: store positions and donor indices, no label.
    A target donor without a cell (of ``data.cell_types``) is refused."""
    positions, donors = [], []
    for split in (VAL, TEST):
        data = datamodule.splits[split]
        kept = np.isin(np.asarray(datamodule.donors)[data.donor_ids], targets) if len(data) else np.zeros(0, bool)
        positions.append(data.positions[kept])
        donors.append(data.donor_ids[kept])
    cells = UnlabelledCells(datamodule.store, np.concatenate(positions), np.concatenate(donors))
    found = {datamodule.donors[index] for index in np.unique(cells.donor_ids)}
    empty = [donor for donor in targets if donor not in found]
    if empty:
        raise InputError(f"adapt.targets: the target donor(s) {empty} have no cell of the kept labels and cell types "
                         f"(data.cell_types={datamodule.cell_types}); choose other donors or cell types")
    return cells


def pad_id(datamodule: CellDataModule) -> int:
    return datamodule.special_token_ids["<pad>"]


# ---- mlm ----


def pretraining_config(cfg: DictConfig, settings: AdaptSettings, targets: list[str]) -> DictConfig:
    """``pretrain.py``'s config for a fold: its data and model, no label read, the training and target donors'
    cells trained on, the validation donors' held out for the masked-gene loss, the other test donors' left out
    (a test split pretraining never reads); on one device, no logger."""
    pre = cfg.copy()
    held_out = [donor for donor in cfg.data.test_donors or [] if donor not in targets]
    with open_dict(pre):
        for key in ("loss", "augment", "robust", "adapt", "calibration", "cv", "sweep", "success_criteria"):
            pre.pop(key, None)
        pre.pretrain = {"masking": dict(settings.masking)}
        pre.seed = settings.seed
        pre.run_name = f"{cfg.run_name}/mlm"
        pre.resume, pre.overwrite, pre.init_from = False, False, None
        given = list(cfg.data.train_donors or [])
        pre.data.update(labels=None, test_donors=held_out, balance_strategy="none",
                        train_donors=given + [donor for donor in targets if donor not in given] if given else None)
        pre.trainer.update(max_epochs=settings.epochs, strategy="auto", devices=1, num_nodes=1)
        for name in ("model_checkpoint", "early_stopping"):
            if pre.callbacks.get(name) is not None:
                pre.callbacks[name].update(monitor="val/masked_loss", mode="min")
        pre.logger = {}
        pre.callbacks.pop("lr_monitor", None)  # it needs a logger
    return pre


def pretrained_for(cfg: DictConfig, settings: AdaptSettings, targets: list[str]) -> Path:
    """The fold's continued pretraining (``hf/`` of a pretraining run), built once per its settings."""
    pre = pretraining_config(cfg, settings, targets)
    recipe = {key: value for key, value in flatten(OmegaConf.to_container(pre, resolve=True)).items()
              if not is_location_key(key)}
    cache = Path(cfg.paths.cache_dir) / "adapt-mlm" / text_fingerprint(sorted(recipe.items()))

    def build(tmp: Path) -> None:
        with open_dict(pre):
            pre.paths.run_dir = str(tmp)
        pretrain(pre)

    if not checked_cache(cache, build):
        log.info("adapt=mlm: the fold's pretraining is cached in %s", cache)
    return cache / "hf"


def fine_tuning_config(cfg: DictConfig, hf: Path) -> DictConfig:
    """The run's config with its encoder the pretrained checkpoint, tokenized with that checkpoint's dictionaries."""
    tuned = cfg.copy()
    with open_dict(tuned):
        tuned.model.encoder = {"_target_": PRETRAINED_BERT, "pretrained": str(hf), "subfolder": None, "revision": None}
        tuned.model.tokenizer.token_dictionary = str(hf / TOKEN_FILE)
        tuned.model.tokenizer.gene_median_dictionary = str(hf / MEDIAN_FILE)
    return tuned


# ---- dann ----


def adversarial_classifier(cfg: DictConfig, datamodule: CellDataModule, fresh: bool, settings: AdaptSettings,
                           targets: list[str]) -> CellClassifier:
    """The run's classifier with its robust strategy inside a TargetAdversary, the target cells attached."""
    built = cfg.copy()
    with open_dict(built):
        built.robust = target_adversary_node(plain(cfg.get("robust")), targets, settings)
    module = classifier_for(built, datamodule, fresh)
    module.robust.attach(module.encoder, target_cells(datamodule, targets), datamodule.donors, pad_id(datamodule),
                         datamodule.max_tokens)
    return module


# ---- after fitting: self_training, tent ----


def classifier_with_targets(cfg: DictConfig, datamodule: CellDataModule, fresh: bool, targets: list[str]
                            ) -> CellClassifier:
    """The run's classifier, once its target donors are known to have cells (before anything is written)."""
    target_cells(datamodule, targets)
    return classifier_for(cfg, datamodule, fresh)


def keep_fitted(best: Path, fitted: Path) -> None:
    """Keep the model to adapt as ``fitted``: ``best`` when fitting wrote it (no ``adaptation`` entry: a first run's
    best epoch, or a newer one of a run resumed to train more epochs); when ``best`` is already adapted (a run
    interrupted after adapting), the ``fitted`` it was adapted from."""
    if ADAPTATION_KEY not in read_checkpoint(best):
        with atomic_path(fitted) as tmp:
            tmp.write_bytes(best.read_bytes())
    elif not fitted.is_file():
        raise InputError(f"{best}: already adapted, and {fitted.name}, the model it was adapted from, is missing; "
                         "start the run again with overwrite=true")


def adapt_fitted(cfg: DictConfig, settings: AdaptSettings, targets: list[str], run: FittedRun) -> str:
    """Adapt the best epoch's model (kept as ``checkpoints/fitted.ckpt``) and write it as ``checkpoints/best.ckpt``;
    its path, for the run's final evaluation. Seeded, so that a resumed run adapts as one left alone."""
    if not run.best_path:
        raise InputError(f"adapt={settings.name}: the run has no best checkpoint to adapt (no validation epoch "
                         "ended); give it trainer.max_epochs >= 1 and a validation split")
    fitted, best = run.layout.checkpoint(FITTED), Path(run.best_path)
    if run.trainer.is_global_zero:
        keep_fitted(best, fitted)
    run.trainer.strategy.barrier()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    checkpoint = read_checkpoint(fitted)
    module: CellClassifier = run.module
    module.load_state_dict(checkpoint["state_dict"])
    module.to(run.trainer.strategy.root_device)  # fitting's end left it on the CPU
    cells = target_cells(run.datamodule, targets)
    method = {"self_training": self_training, "tent": tent}[settings.name]
    record = {"method": settings.name, "targets": targets, "target_cells": len(cells),
              **method(cfg, settings, run, cells)}
    if run.trainer.is_global_zero:
        state = {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}
        with atomic_path(best) as tmp:
            torch.save({**checkpoint, "state_dict": state, ADAPTATION_KEY: record}, tmp)
        write_json(run.layout.adaptation, record)
    run.trainer.strategy.barrier()
    return str(best)


def tent(cfg: DictConfig, settings: AdaptSettings, run: FittedRun, cells: UnlabelledCells) -> dict[str, Any]:
    module: CellClassifier = run.module
    entropies = entropy_minimisation(module.forward, module, cells, settings.steps, settings.lr,
                                     run.datamodule.batch_size, module.seed, pad_id(run.datamodule))
    if entropies:
        log.info("adapt=tent: %d steps, the target batches' mean entropy %.4f -> %.4f", len(entropies), entropies[0],
                 entropies[-1])
    return {"steps": settings.steps, "lr": settings.lr, "entropy": entropies}


def probabilities(module: CellClassifier, datamodule: CellDataModule, cells: UnlabelledCells,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """The model's class probabilities of each cell, in the cells' order, on ``device``, through the one inference
    path (batches of ``data.eval_batch_size`` cells or ``data.max_tokens`` padded tokens, halved on a GPU's
    out-of-memory); the module is left there, in eval mode."""
    model = TrainedClassifier(module, datamodule.dictionaries, datamodule.settings, {})
    return model.apply(cells.store, cells.positions, batch_size=datamodule.eval_batch_size,
                       max_tokens=datamodule.max_tokens, device=device)[0]


class BestState(pl.Callback):
    """The weights of the best validation epoch (``monitor``, ``mode``), kept in memory."""

    def __init__(self, monitor: str, mode: str) -> None:
        self.monitor, self.mode = monitor, mode
        self.value: float | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if self.value is None or (value > self.value if self.mode == "max" else value < self.value):
            self.value = value
            self.state = {name: tensor.detach().cpu().clone() for name, tensor in pl_module.state_dict().items()}


def train_round(cfg: DictConfig, run: FittedRun, cells: UnlabelledCells, rows: np.ndarray, labels: np.ndarray,
                epochs: int) -> list[float]:
    """Train the run's model ``epochs`` epochs on the training cells plus the target cells at ``rows`` with their
    pseudo-labels ``labels``; keep the epoch best on the validation donors. Each epoch's validation figure."""
    labelled = run.datamodule.splits[TRAIN]
    training = TokenDataset(run.datamodule.store, np.concatenate([labelled.positions, cells.positions[rows]]),
                            np.concatenate([labelled.label_ids, labels]),
                            np.concatenate([labelled.donor_ids, cells.donor_ids[rows]]))
    selection = cfg.callbacks.get("model_checkpoint") or {}
    best = BestState(selection.get("monitor", MONITOR), selection.get("mode", "max"))
    figures: list[float] = []

    class Figures(pl.Callback):
        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if not trainer.sanity_checking and best.monitor in trainer.callback_metrics:
                figures.append(float(trainer.callback_metrics[best.monitor]))

    round_cfg = cfg.copy()
    with open_dict(round_cfg):
        round_cfg.trainer.update(max_epochs=epochs, enable_checkpointing=False)
        round_cfg.callbacks, round_cfg.logger = {}, {}
    trainer = build_trainer(round_cfg, [best, Figures()])
    trainer.fit(run.module, datamodule=run.datamodule.training_on(training))
    if best.state is not None:
        run.module.load_state_dict(best.state)
    return figures


def self_training(cfg: DictConfig, settings: AdaptSettings, run: FittedRun, cells: UnlabelledCells
                  ) -> dict[str, Any]:
    module: CellClassifier = run.module
    rounds: list[dict[str, Any]] = []

    def announce(pseudo: PseudoLabelRound) -> None:
        counts = pseudo.counts(module.class_names)
        log.info("adapt=self_training round %d (share %.2f): %d of %d target cells pseudo-labelled, %s", pseudo.round,
                 pseudo.share, len(pseudo.rows), len(cells), ", ".join(f"{k} {v}" for k, v in counts.items()))
        rounds.append({"round": pseudo.round, "share": pseudo.share, "cells": len(pseudo.rows), "counts": counts})

    def fit(rows: np.ndarray, labels: np.ndarray) -> None:
        rounds[-1]["val"] = train_round(cfg, run, cells, rows, labels, settings.epochs)

    device = run.trainer.strategy.root_device  # each round's fit ends with the module on the CPU
    self_train(lambda: probabilities(module, run.datamodule, cells, device), fit, settings.rounds, settings.threshold,
               on_round=announce)
    return {"threshold": settings.threshold, "rounds": rounds}
