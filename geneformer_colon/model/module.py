"""The LightningModule: Geneformer encoder + pooling + head, with masking, mixup and the loss.

Training step: mask gene tokens -> encode -> pool to a cell embedding -> mix up embeddings
and soft targets -> head -> loss. Evaluation steps: no masking, no mixup; metrics and each
cell's class probabilities are kept for the run's prediction files.

The module is built from plain settings only, all saved as the checkpoint's hyper-parameters:
``CellClassifier.load_from_checkpoint(best.ckpt)`` rebuilds it with no other argument (the
encoder's shape from ``bert_config``, its weights from the checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import BertModel

from geneformer_colon.common.names import EVAL_SPLITS, VAL, logged
from geneformer_colon.model.augment import BatchAugment
from geneformer_colon.model.backbone import (
    CellEncoder,
    ClassifierHead,
    bert_from_config,
)
from geneformer_colon.model.losses import FocalLoss
from geneformer_colon.model.metrics import ClassificationMetrics, worst_group_macro_f1
from geneformer_colon.model.robust import DonorStrategy, PlainTraining, TrainingBatch
from geneformer_colon.runs.config import instantiate_trusted

DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "lr": 5.0e-5, "weight_decay": 0.01}
DEFAULT_SCHEDULER = {"_target_": "geneformer_colon.model.schedules.warmup_schedule", "name": "linear",
                     "warmup_ratio": 0.1}
_WHERE = "the model's settings (checkpoint hyper-parameters)"


def _decayed(name: str) -> bool:
    """Weight decay applies to weight matrices, not to biases, LayerNorms or embeddings' norms."""
    return not (name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name)


def optimization(module: pl.LightningModule, optimizer: dict[str, Any] | None, scheduler: dict[str, Any] | None
                 ) -> dict[str, Any]:
    """``configure_optimizers``' answer: the optimizer config node called with the trainable parameters (no
    weight decay on biases and norms), the scheduler node with the run's total number of optimizer steps."""
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    groups = [  # named for LearningRateMonitor's columns (lr-AdamW/weights, ...)
        {"params": [p for name, p in named if _decayed(name)], "name": "weights"},
        {"params": [p for name, p in named if not _decayed(name)], "weight_decay": 0.0, "name": "biases_norms"},
    ]
    made = instantiate_trusted(optimizer or DEFAULT_OPTIMIZER, _WHERE, _partial_=True)(groups)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    schedule = instantiate_trusted(scheduler or DEFAULT_SCHEDULER, _WHERE, _partial_=True)(
        made, num_training_steps=total)
    return {"optimizer": made, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def step_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (seed, epoch, batch, rank)."""
    return int(np.random.SeedSequence([int(part) for part in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class CellOutputs:
    """What the classifier makes of a batch of cells: the head's logits and the pooled embeddings it saw."""

    logits: torch.Tensor
    embeddings: torch.Tensor

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.float().softmax(dim=-1)


class SeededModule(pl.LightningModule):
    """What the project's trained models share: every training step's random draws seeded by (seed, epoch,
    batch, rank), so a run resumed at any step draws what it would have drawn; the optimizer and scheduler
    made from their config nodes (the hyper-parameters ``optimizer`` and ``scheduler``); and each
    validation epoch's metrics (``epoch_history``) carried in checkpoints, so a resumed run's record is whole.
    """

    seed: int
    epoch_history: list[dict[str, float]]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(step_seed(self.seed, self.current_epoch, batch_idx, self.global_rank))

    def configure_optimizers(self) -> dict[str, Any]:
        made = optimization(self, self.hparams.optimizer, self.hparams.scheduler)
        # what the config gave each parameter group: a resumed run's restored optimizer gets it back on_train_start
        self._configured_groups = [{key: value for key, value in group.items() if key not in ("params", "lr")}
                                   for group in made["optimizer"].param_groups]
        return made

    def on_train_start(self) -> None:
        """The optimizer and scheduler go on with the values of the config, not those a resumed run's checkpoint
        restored: with ``allow_resume_changes=true`` a changed ``optimizer.*`` (learning rate, weight decay, ...)
        or ``scheduler.*`` is what trains. The learning rate of the step reached is the configured one through
        the (configured) schedule; a run resumed unchanged gets back exactly what it had."""
        configured = getattr(self, "_configured_groups", None)
        if configured is None or len(self.trainer.optimizers) != 1:
            return
        groups = self.trainer.optimizers[0].param_groups
        for group, values in zip(groups, configured):
            group.update(values)
        for config in self.trainer.lr_scheduler_configs:
            schedule = config.scheduler
            if isinstance(schedule, LambdaLR):
                schedule.base_lrs = [group["initial_lr"] for group in groups]
                for group, base, factor in zip(groups, schedule.base_lrs, schedule.lr_lambdas):
                    group["lr"] = base * factor(schedule.last_epoch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["epoch_history"] = self.epoch_history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.epoch_history = list(checkpoint.get("epoch_history", []))


class CellClassifier(SeededModule):
    """Classifies cells; logs ``val/...`` and ``test/...`` metrics every epoch.

    After an evaluation epoch, ``results[split]`` holds the metrics, the confusion matrix and
    every cell's (store position, true class, probabilities; embedding when ``keep_embeddings``).

    ``bert_config``: the encoder's ``BertConfig`` as a dict; ``bert``: the encoder itself when
    the caller has one (pretrained weights), else one of that shape is built. ``loss``,
    ``augment``, ``optimizer`` and ``scheduler`` are config nodes with a ``_target_`` (the
    optimizer and scheduler are instantiated as partials in ``configure_optimizers``).
    ``tokenizer``: the model version and input size the cells were tokenized with.
    ``donors``: the names behind the batches' donor indices (the datamodule's ``donors``);
    ``train_donors``: those a ``robust`` strategy (a config node of the ``robust`` group) acts on.
    ``lora``: LoRA adapters on the encoder (``model.lora``), None for full fine-tuning.
    ``attn_implementation``, ``gradient_checkpointing``: how the encoder computes (:class:`CellEncoder`).
    """

    def __init__(
        self,
        bert_config: dict[str, Any],
        class_names: Sequence[str],
        special_token_ids: dict[str, int],
        tokenizer: dict[str, Any] | None = None,
        pooling: str = "mean",
        head_dropout: float = 0.1,
        freeze_layers: int = 0,
        loss: dict[str, Any] | None = None,
        augment: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        seed: int = 0,
        donors: Sequence[str] = (),
        train_donors: Sequence[str] = (),
        robust: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        bert: BertModel | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["bert"], logger=False)
        self.class_names = list(class_names)
        self.encoder = CellEncoder(bert if bert is not None else bert_from_config(bert_config), pooling=pooling,
                                   freeze_layers=freeze_layers, lora=lora, attn_implementation=attn_implementation,
                                   gradient_checkpointing=gradient_checkpointing,
                                   frame_token_ids=[special_token_ids[name] for name in ("<cls>", "<eos>")
                                                    if name in special_token_ids])
        self.head = ClassifierHead(self.encoder.hidden_size, len(self.class_names), dropout=head_dropout)
        self.loss = instantiate_trusted(loss, _WHERE, class_names=self.class_names) if loss else \
            FocalLoss(self.class_names)
        self.augment = instantiate_trusted(augment, _WHERE) if augment else BatchAugment()
        self.mask_token_id = special_token_ids["<mask>"]
        self.protected_token_ids = sorted(
            special_token_ids[name] for name in ("<pad>", "<cls>", "<eos>") if name in special_token_ids
        )
        self.seed = seed
        self.donors, train_donors = list(donors), list(train_donors)
        self.robust: DonorStrategy = instantiate_trusted(
            robust, _WHERE, donors=train_donors, hidden_size=self.encoder.hidden_size) if robust else \
            PlainTraining(train_donors, self.encoder.hidden_size)
        # a batch's donor index (into donors) -> the training donor's index (into train_donors), -1 for others
        self.register_buffer("train_donor_index", torch.tensor(
            [train_donors.index(name) if name in train_donors else -1 for name in self.donors], dtype=torch.long),
            persistent=False)
        self.metrics = nn.ModuleDict({split: ClassificationMetrics(self.class_names) for split in EVAL_SPLITS})
        self.epoch_history: list[dict[str, float]] = []
        self.results: dict[str, dict[str, Any]] = {}
        self.keep_embeddings = False
        self._outputs: dict[str, list[tuple[torch.Tensor, ...]]] = {split: [] for split in EVAL_SPLITS}

    def infer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> CellOutputs:
        """The one inference call (evaluation, predict, embed, export's check, perturbation): the pooled cell
        embeddings and the head's logits, from padded token ids and their attention mask."""
        embeddings = self.encoder(input_ids, attention_mask)
        return CellOutputs(self.head(embeddings), embeddings)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.infer(input_ids, attention_mask).logits

    # ---- training ----

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids = self.augment.mask(batch["input_ids"], batch["attention_mask"], self.mask_token_id,
                                      self.protected_token_ids)
        embeddings = self.encoder(input_ids, batch["attention_mask"])
        targets = F.one_hot(batch["labels"], len(self.class_names)).to(embeddings.dtype)
        mixed, targets = self.augment.mix(embeddings, targets, donors=batch["donors"], labels=batch["labels"])
        steps = self._trainer.estimated_stepping_batches if self._trainer is not None else 1
        progress = min(1.0, self.global_step / max(1, steps))
        loss, figures = self.robust(TrainingBatch(self.loss, self.head(mixed), targets, embeddings,
                                                  self.train_donor_index[batch["donors"]], progress))
        if not torch.isfinite(loss):  # a diverged run stops here rather than training on NaN weights
            raise FloatingPointError(
                f"train/loss is {loss.item()} at epoch {self.current_epoch + 1}, step {self.global_step}: training "
                "diverged; lower optimizer.lr or set trainer.gradient_clip_val"
            )
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(targets))
        if figures:
            self.log_dict(figures, on_step=False, on_epoch=True, batch_size=len(targets))
        return loss * batch["loss_scale"] if "loss_scale" in batch else loss  # a token budget's batches: pad_batch

    def on_train_epoch_end(self) -> None:
        figures = self.robust.epoch_figures()
        if figures:
            self.log_dict(figures)

    # ---- evaluation ----

    def _eval_step(self, split: str, batch: dict[str, torch.Tensor]) -> None:
        outputs = self.infer(batch["input_ids"], batch["attention_mask"])
        loss = self.loss(outputs.logits, batch["labels"])
        probabilities = outputs.probabilities
        self.metrics[split].update(probabilities, batch["labels"], loss)
        kept = [batch["index"].cpu(), batch["labels"].cpu(), probabilities.cpu(), batch["donors"].cpu()]
        if self.keep_embeddings:
            kept.append(outputs.embeddings.float().cpu())
        self._outputs[split].append(tuple(kept))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_epoch_end(self, split: str) -> None:
        metrics = self.metrics[split]
        values = metrics.compute()
        confusion = metrics.confusion_matrix()
        metrics.reset()
        outputs = self._outputs[split]
        self._outputs[split] = []
        columns = [torch.cat(column) for column in zip(*outputs)]
        if self.trainer.world_size > 1:
            columns = [self._gather_ragged(column) for column in columns]
        worst = worst_group_macro_f1(columns[1].numpy(), columns[2].numpy().argmax(axis=1), columns[3].numpy())
        if worst is not None:  # a split of several donors
            values["worst_donor_macro_f1"] = worst
        self.log_dict({logged(split, name): value for name, value in values.items()}, sync_dist=False)
        self.results[split] = {
            "metrics": values,
            "confusion_matrix": confusion,
            "index": columns[0].numpy(),
            "targets": columns[1].numpy(),
            "probabilities": columns[2].numpy(),
        }
        if self.keep_embeddings:
            self.results[split]["embeddings"] = columns[4].numpy()
        if split == VAL and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.epoch_history.append({"epoch": self.current_epoch, **{logged(VAL, k): v for k, v in values.items()}})

    def _gather_ragged(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, concatenated: ranks may hold different numbers of rows (all_gather needs
        equal shapes, so each pads to the longest share and the padding is cut off again)."""
        sizes = self.all_gather(torch.tensor(len(tensor), device=self.device)).flatten().tolist()
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: len(tensor)] = tensor
        gathered = self.all_gather(padded.to(self.device)).cpu()
        return torch.cat([rows[:size] for rows, size in zip(gathered, sizes)])

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
