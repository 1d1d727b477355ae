"""A callback for tests (on PYTHONPATH in their subprocesses): each DDP rank's group DRO donor weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl


class SaveDonorWeights(pl.Callback):
    """As training ends, ``<directory>/rank<r>.json``: this rank's group DRO weights, one a training donor."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        weights = pl_module.robust.weights.tolist()
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(weights))
