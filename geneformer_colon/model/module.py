"""The LightningModule: Geneformer encoder + pooling + head, with masking, mixup and the loss.

Training step: mask gene tokens -> encode -> pool to a cell embedding -> mix up embeddings
and soft targets -> head -> loss. Evaluation steps: no masking, no mixup; metrics and each
cell's class probabilities are kept for the run's prediction files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from geneformer_colon.model.augment import BatchAugment
from geneformer_colon.model.backbone import CellEncoder, ClassifierHead
from geneformer_colon.report.metrics import ClassificationMetrics

EVAL_SPLITS = ("val", "test")


def _decayed(name: str) -> bool:
    """Weight decay applies to weight matrices, not to biases, LayerNorms or embeddings' norms."""
    return not (name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name)


class CellClassifier(pl.LightningModule):
    """Classifies cells; logs ``val/...`` and ``test/...`` metrics every epoch.

    After an evaluation epoch, ``results[split]`` holds the metrics, the confusion matrix and
    every cell's (store position, true class, probabilities) for the run's files.
    """

    def __init__(
        self,
        encoder: CellEncoder,
        head: ClassifierHead,
        loss: nn.Module,
        augment: BatchAugment,
        class_names: Sequence[str],
        special_token_ids: dict[str, int],
        lr: float,
        weight_decay: float = 0.01,
        betas: Sequence[float] = (0.9, 0.999),
        warmup_ratio: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.loss = loss
        self.augment = augment
        self.class_names = list(class_names)
        self.mask_token_id = special_token_ids["<mask>"]
        self.protected_token_ids = sorted(
            special_token_ids[name] for name in ("<pad>", "<cls>", "<eos>") if name in special_token_ids
        )
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_ratio = warmup_ratio
        self.seed = seed
        self.metrics = nn.ModuleDict({split: ClassificationMetrics(self.class_names) for split in EVAL_SPLITS})
        self.epoch_history: list[dict[str, float]] = []
        self.results: dict[str, dict[str, Any]] = {}
        self._outputs: dict[str, list[tuple[torch.Tensor, ...]]] = {split: [] for split in EVAL_SPLITS}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask))

    # ---- training ----

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Reseed as each epoch's first step starts (the data loader has drawn its own seed by
        # then): masking, mixup and dropout draw the same numbers whether the run went
        # straight through or was resumed at this epoch.
        if batch_idx == 0:
            torch.manual_seed(self.seed * 100_003 + self.current_epoch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids = self.augment.mask(batch["input_ids"], batch["attention_mask"], self.mask_token_id,
                                      self.protected_token_ids)
        embeddings = self.encoder(input_ids, batch["attention_mask"])
        targets = F.one_hot(batch["labels"], len(self.class_names)).to(embeddings.dtype)
        embeddings, targets = self.augment.mix(embeddings, targets)
        loss = self.loss(self.head(embeddings), targets)
        if not torch.isfinite(loss):  # a diverged run stops here rather than training on NaN weights
            raise FloatingPointError(
                f"train/loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step}: training "
                "diverged; lower optimizer.lr (model.learning_rate) or set trainer.gradient_clip_val"
            )
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(targets))
        return loss

    # ---- evaluation ----

    def _eval_step(self, split: str, batch: dict[str, torch.Tensor]) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = self.loss(logits, batch["labels"])
        probabilities = logits.float().softmax(dim=-1)
        self.metrics[split].update(probabilities, batch["labels"], loss)
        self._outputs[split].append((batch["index"].cpu(), batch["labels"].cpu(), probabilities.cpu()))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_epoch_end(self, split: str) -> None:
        metrics = self.metrics[split]
        values = metrics.compute()
        confusion = metrics.confusion_matrix()
        metrics.reset()
        self.log_dict({f"{split}/{name}": value for name, value in values.items()}, sync_dist=False)
        outputs = self._outputs[split]
        self._outputs[split] = []
        index, targets, probabilities = (torch.cat(column) for column in zip(*outputs))
        if self.trainer.world_size > 1:
            index, targets, probabilities = (self._gather_ragged(t) for t in (index, targets, probabilities))
        self.results[split] = {
            "metrics": values,
            "confusion_matrix": confusion,
            "index": index.numpy(),
            "targets": targets.numpy(),
            "probabilities": probabilities.numpy(),
        }
        if split == "val" and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.epoch_history.append({"epoch": self.current_epoch, **{f"val/{k}": v for k, v in values.items()}})

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

    # ---- optimisation ----

    def configure_optimizers(self) -> dict[str, Any]:
        named = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for name, p in named if _decayed(name)], "weight_decay": self.weight_decay},
            {"params": [p for name, p in named if not _decayed(name)], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(total * self.warmup_ratio)

        def linear_warmup_then_decay(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_then_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints carry the per-epoch history, so a resumed run's metrics.json is whole ----

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["epoch_history"] = self.epoch_history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.epoch_history = list(checkpoint.get("epoch_history", []))
