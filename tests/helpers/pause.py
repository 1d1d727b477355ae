"""A callback for tests (on PYTHONPATH in their subprocesses): stand still at one training step."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytorch_lightning as pl


class PauseAtStep(pl.Callback):
    """At ``batch`` of ``epoch``, once (the marker file remembers): write the marker with this process id,
    then wait until ``<marker>.sent`` exists, so a test can signal the run at a known step."""

    def __init__(self, epoch: int, batch: int, marker: str) -> None:
        self.epoch = epoch
        self.batch = batch
        self.marker = Path(marker)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.current_epoch != self.epoch or batch_idx != self.batch or self.marker.exists():
            return
        self.marker.write_text(str(os.getpid()))
        sent = self.marker.with_name(self.marker.name + ".sent")
        deadline = time.monotonic() + 120
        while not sent.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
