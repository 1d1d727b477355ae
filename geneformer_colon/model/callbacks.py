"""Lightning callbacks that keep a run directory whole: checkpoints a paused run resumes from exactly,
a best checkpoint that moves with its directory, and every epoch's metrics on disk as they come; and
what a user sees of a run: a log line an epoch, and a progress bar on a terminal only."""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint, RichProgressBar

from geneformer_colon.common.errors import Interrupted
from geneformer_colon.common.names import METRICS

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalLatch:
    """While installed, SIGTERM and Ctrl-C are remembered (``received``) instead of ending the process at
    once, for the run to stop where it can be resumed; a second Ctrl-C stops at once."""

    def __init__(self, then: str) -> None:
        self.then = then  # what happens next, for the log
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("%s received: %s", signal.Signals(signum).name, self.then)

    def install(self) -> None:
        self.received = None
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class LastCheckpoint(Checkpoint):
    """``last.ckpt`` is the latest state: written at every epoch's end, and on SIGTERM or Ctrl-C.

    A ``Checkpoint`` callback, so Lightning runs it after the other callbacks at an epoch's end:
    the best checkpoint and early stopping have taken the epoch into account when it saves.

    A signal during training is not acted on at once: the step in progress (with the rest of its
    gradient-accumulation window) finishes, the state is saved with the data loader's position in
    the epoch, and :class:`Interrupted` is raised; in an epoch's last window, the epoch (its
    validation included) finishes first. ``resume=true`` then goes on from exactly there. A
    second Ctrl-C stops at once (the last epoch's checkpoint stays). Whether training was to stop
    (early stopping) is saved too, so a run resumed after its last epoch does not train another.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.signals = SignalLatch("saving the run at the end of this step")
        self.should_stop = False

    # ---- signals ----

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning installed its own SIGTERM handler (which would stop mid-accumulation).
        trainer.should_stop = trainer.should_stop or self.should_stop
        self.signals.install()

    def state_dict(self) -> dict[str, Any]:
        return {"should_stop": self.should_stop}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.should_stop = bool(state_dict.get("should_stop", False))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signals.restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.signals.restore()

    def _stop_requested(self, trainer: pl.Trainer) -> bool:
        """Whether any rank received a signal (all ranks must stop at the same step)."""
        asked = self.signals.received is not None
        if trainer.world_size > 1:
            flag = torch.tensor([self.signals.received or 0], device=trainer.strategy.root_device)
            flag = trainer.strategy.reduce(flag, reduce_op="max")
            asked, self.signals.received = bool(flag.item()), int(flag.item()) or None
        return asked

    # ---- saving ----

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        done = batch_idx + 1
        window_closed = done % trainer.accumulate_grad_batches == 0
        if window_closed and done < trainer.num_training_batches and self._stop_requested(trainer):
            trainer.save_checkpoint(self.path)
            raise Interrupted.resumable(self.signals.received, self.path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.should_stop = trainer.should_stop
        trainer.save_checkpoint(self.path)
        if self._stop_requested(trainer) and not trainer.should_stop:  # else training ends here anyway
            raise Interrupted.resumable(self.signals.received, self.path)


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose saved state names files relative to its folder.

    A run directory moved or copied elsewhere then resumes into itself: the best checkpoint it
    compares against, replaces and finally tests is the one beside it, never the original's.
    """

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        relative: Callable[[str], str] = lambda path: os.path.relpath(path, self.dirpath) if path else path  # noqa: E731
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            state[key] = relative(state[key])
        state["best_k_models"] = {relative(path): score for path, score in state["best_k_models"].items()}
        state["dirpath"] = "."
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath") != ".":  # a checkpoint of plain ModelCheckpoint: its paths as they are
            super().load_state_dict(state_dict)
            return
        absolute: Callable[[str], str] = lambda path: os.path.join(self.dirpath, path) if path else path  # noqa: E731
        state = dict(state_dict, dirpath=self.dirpath)
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            state[key] = absolute(state[key])
        state["best_k_models"] = {absolute(path): score for path, score in state_dict["best_k_models"].items()}
        super().load_state_dict(state)


class RecordEpochs(pl.Callback):
    """Hand every validation epoch's metrics to ``write`` as they come, so a crash loses no epoch."""

    def __init__(self, write: Callable[[list[dict[str, float]]], None]) -> None:
        self.write = write

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.write(list(pl_module.epoch_history))


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class EpochLog(pl.Callback):
    """One line through Python logging at the end of every epoch that validated, so a log file (Hydra's
    ``train.log``, a redirected stdout, SLURM's output) shows progress: the epoch counted from 1, the
    training loss, the validation figures the module recorded (``epoch_history``, what metrics.json
    holds), per-class recall, the time since training started and the time the remaining epochs would take
    at this pace (early stopping may end sooner)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.first_epoch = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started, self.first_epoch = time.monotonic(), trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        history = getattr(pl_module, "epoch_history", None)
        if not trainer.is_global_zero or not history or history[-1]["epoch"] != trainer.current_epoch:
            return
        log.info("%s", self.line(history[-1], trainer))

    def line(self, epoch: dict[str, float], trainer: pl.Trainer) -> str:
        number = int(epoch["epoch"]) + 1
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        parts = []
        train_loss = next((float(value) for key, value in trainer.callback_metrics.items()
                           if key.startswith("train/") and key.endswith("loss_epoch")), None)
        if train_loss is not None:
            parts.append(f"train loss {train_loss:.4f}")
        figures = [key.split("/", 1)[1] for key in epoch if key.startswith("val/") and key.count("/") == 1]
        parts += [f"val {METRICS.get(name, name.replace('_', ' '))} {epoch[f'val/{name}']:.4f}" for name in figures]
        recalls = [f"{key.split('/', 2)[2]} {value:.4f}" for key, value in epoch.items()
                   if key.startswith("val/recall/")]
        if recalls:
            parts.append("recall " + " ".join(recalls))
        elapsed = time.monotonic() - self.started
        timing = f"{_duration(elapsed)} elapsed"
        if total:
            done = trainer.current_epoch + 1 - self.first_epoch
            timing += f", ~{_duration(elapsed / max(done, 1) * max(total - trainer.current_epoch - 1, 0))} left"
        return (f"epoch {number}/{total}: " if total else f"epoch {number}: ") + ", ".join(parts) + "; " + timing


class EpochProgressBar(RichProgressBar):
    """Rich's progress bar on a terminal only (in a log file it is noise), counting epochs from 1 of
    ``max_epochs`` as the epoch log lines do."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not sys.stdout.isatty():
            self.disable()

    def _get_train_description(self, current_epoch: int) -> str:
        total = self.trainer.max_epochs
        text = f"Epoch {current_epoch + 1}" + (f"/{total}" if total and total > 0 else "")
        return f"{text:{len(self.validation_description)}}"  # as wide as "Validation": no flicker
