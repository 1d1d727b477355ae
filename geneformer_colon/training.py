"""One training run, start to finish: fit, pick the best epoch, test it, write the run directory."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from geneformer_colon.builders import (
    build_datamodule,
    build_module,
    build_trainer,
    start_from,
)
from geneformer_colon.data.datamodule import CellDataModule
from geneformer_colon.errors import InputError
from geneformer_colon.io import atomic_path, write_json
from geneformer_colon.model.module import CellClassifier
from geneformer_colon.report.artifacts import write_split_files
from geneformer_colon.report.history import write_history
from geneformer_colon.report.summary import check_success, print_summary
from geneformer_colon.report.wandb_run import (
    finishing_wandb_run,
    flat_config,
    report_run,
)

log = logging.getLogger(__name__)

# What a run writes into its directory (Hydra's own .hydra/ and log are left alone).
RUN_FILES = ("checkpoints", "metrics.json", "config.yaml", "predictions", "plots", "csv", "dictionaries", "eval",
             "wandb", "history.md")


class SaveOnInterrupt(pl.Callback):
    """Ctrl-C or SIGTERM: make sure ``last.ckpt`` holds the latest state, for ``resume=true``.

    Interrupted before the epoch's first step, the ``last.ckpt`` written at the end of the
    previous epoch is already exact and is kept; later in an epoch, the state is saved as is
    and Lightning resumes within that epoch.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.steps_this_epoch = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.steps_this_epoch = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self.steps_this_epoch += 1

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            return
        if self.steps_this_epoch > 0 or not self.path.is_file():
            trainer.save_checkpoint(self.path)
        log.warning("interrupted: continue from %s with resume=true", self.path)


class RecordEpochs(pl.Callback):
    """Rewrite metrics.json after every validation epoch, so a crash loses no epoch's figures."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_validation_end(self, trainer: pl.Trainer, pl_module: CellClassifier) -> None:
        if trainer.is_global_zero and trainer.state.fn == "fit" and not trainer.sanity_checking:
            write_json(self.path, {"status": "running", "epochs": pl_module.epoch_history})


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to mix two runs in one directory; return the checkpoint to resume from, if asked."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume:
        if not last.is_file():
            raise InputError(f"{run_dir}: resume=true but there is no checkpoints/last.ckpt to continue from")
        return last
    if rank_zero_only.rank != 0:  # a DDP rank: its rank 0 has checked (and maybe cleared) the directory
        return None
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if existing and not overwrite:
        raise InputError(
            f"{run_dir}: already holds a run ({', '.join(existing)}); continue it with resume=true, "
            "replace it with overwrite=true, or pick another run_name=..."
        )
    for name in existing:
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return None


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    with atomic_path(run_dir / "config.yaml") as tmp:
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))


def write_split_outputs(
    run_dir: Path, module: CellClassifier, datamodule: CellDataModule, split: str, title: str
) -> dict[str, Any]:
    """predictions/<split>.csv and plots/confusion_<split>.png from the module's last evaluation."""
    result = module.results[split]
    if module.trainer.is_global_zero:  # under DDP every rank holds the gathered results: one writes them
        write_split_files(run_dir, split, datamodule.store.cells.iloc[result["index"]], result["targets"],
                          result["probabilities"], result["confusion_matrix"], module.class_names, title)
    return {**result["metrics"], "confusion_matrix": result["confusion_matrix"]}


def best_epoch(epochs: list[dict[str, float]], monitor: str = "val/macro_f1") -> int | None:
    """The first epoch with the highest monitored value (what ModelCheckpoint keeps)."""
    if not epochs:
        return None
    return max(epochs, key=lambda epoch: (epoch[monitor], -epoch["epoch"]))["epoch"]


@finishing_wandb_run()
def run_training(cfg: DictConfig) -> float:
    """Train, test the best checkpoint, write every file of the run; return best val macro F1."""
    run_dir = Path(cfg.paths.run_dir)
    resume_from = prepare_run_dir(run_dir, cfg.resume, cfg.overwrite)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    if cfg.init_from and resume_from is None:
        log.info("starting from the weights of %s", start_from(module, cfg.init_from, cfg.model.reinit_head))
    if rank_zero_only.rank == 0:  # DDP: the first process writes the run directory
        save_config(cfg, run_dir)
        datamodule.dictionaries.save(run_dir / "dictionaries")

    metrics_path = run_dir / "metrics.json"
    trainer = build_trainer(cfg, [SaveOnInterrupt(run_dir / "checkpoints" / "last.ckpt"), RecordEpochs(metrics_path)])
    for logger in trainer.loggers:  # flat keys (loss.focal_gamma, ...) that W&B's run table filters by
        logger.log_hyperparams(flat_config(cfg))
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    epochs = list(module.epoch_history)  # evaluating the best checkpoint below reloads its shorter history
    checkpoint = next(c for c in trainer.callbacks if isinstance(c, ModelCheckpoint))
    best_path = checkpoint.best_model_path or checkpoint.last_model_path

    final: dict[str, Any] = {}
    for split, evaluate in (("val", trainer.validate), ("test", trainer.test)):
        evaluate(module, datamodule=datamodule, ckpt_path=best_path, weights_only=True, verbose=False)
        final[split] = write_split_outputs(run_dir, module, datamodule, split, f"{cfg.run_name} {split}")
    success = check_success(cfg.success_criteria, final)
    summary = {
        "run_name": cfg.run_name,
        "status": "finished",
        "epochs": epochs,
        "best_epoch": best_epoch(epochs),
        "best_checkpoint": str(Path(best_path).relative_to(run_dir)) if best_path else None,
        "init_from": str(cfg.init_from) if cfg.init_from else None,
        **final,
        "success": success,
    }
    if trainer.is_global_zero:
        write_json(metrics_path, summary)
        report_run(trainer.loggers, summary, module.class_names, run_dir)
        write_history(run_dir)
        print_summary(summary, module.class_names, run_dir)
    return final["val"]["macro_f1"]
