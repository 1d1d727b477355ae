"""Masked-gene pretraining: Geneformer's objective on unlabelled cells.

Of each cell's gene tokens (never ``<pad>``, ``<cls>`` or ``<eos>``) a share ``select`` is chosen;
of those, a share ``mask`` becomes ``<mask>``, a share ``random`` a random gene token, and the
rest stay as they are; the loss is the cross-entropy of the original token at the chosen
positions only (labels -100 elsewhere). The model is a ``BertForMaskedLM`` whose encoder is made
like the classifier's (``model.encoder``), so a pretrained run's ``hf/`` folder is a checkpoint
that ``model=pretrained`` fine-tunes and Geneformer's own tools load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric
from transformers import BertForMaskedLM, BertModel

from geneformer_colon.common.errors import InputError
from geneformer_colon.common.names import VAL
from geneformer_colon.model.backbone import bert_from_config, with_masked_lm_head
from geneformer_colon.model.module import SeededModule, step_seed

IGNORED = -100  # the label of a position the loss leaves out
VALIDATION_STREAM = 2**31  # in place of the epoch: validation masks are the same every epoch


@dataclass(frozen=True)
class MaskingRates:
    """``select``: the share of gene tokens chosen; of those, ``mask`` become <mask>, ``random`` a random gene."""

    select: float = 0.15
    mask: float = 0.8
    random: float = 0.1

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0 <= value <= 1:
                raise InputError(f"pretrain.masking.{name} is {value}; set it to a share in [0, 1]")
        if self.mask + self.random > 1:
            raise InputError(f"pretrain.masking.mask + random is {self.mask + self.random}; they share the selected "
                             "tokens, so their sum must be at most 1")


def mask_genes(input_ids: torch.Tensor, attention_mask: torch.Tensor, protected_ids: Sequence[int], mask_token_id: int,
               gene_token_ids: torch.Tensor, rates: MaskingRates, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked input and the labels (the original token where chosen, -100 elsewhere)."""
    device = generator.device if generator is not None else input_ids.device
    protected = torch.tensor(list(protected_ids), dtype=input_ids.dtype, device=input_ids.device)
    is_gene = attention_mask.bool() & ~torch.isin(input_ids, protected)
    draw = torch.rand(input_ids.shape, generator=generator, device=device).to(input_ids.device)
    chosen = is_gene & (draw < rates.select)
    labels = input_ids.masked_fill(~chosen, IGNORED)
    # Split the chosen positions by a second draw: [0, mask) -> <mask>, [mask, mask + random) -> a gene.
    how = torch.rand(input_ids.shape, generator=generator, device=device).to(input_ids.device)
    masked = input_ids.masked_fill(chosen & (how < rates.mask), mask_token_id)
    replace = chosen & (how >= rates.mask) & (how < rates.mask + rates.random)
    picks = torch.randint(len(gene_token_ids), input_ids.shape, generator=generator, device=device)
    random_genes = gene_token_ids.to(input_ids.device)[picks.to(input_ids.device)]
    return torch.where(replace, random_genes, masked), labels


class MaskedGeneModel(SeededModule):
    """Pretrains a BERT on masked genes; logs ``val/masked_loss`` and ``val/masked_accuracy`` every epoch.

    Built from plain settings (saved as hyper-parameters): ``bert_config`` (the encoder's shape),
    the special token ids, the gene token ids random replacements draw from, the masking rates,
    and the optimizer and scheduler config nodes. ``model``: the BertForMaskedLM when the caller
    has one (pretrained weights).
    """

    def __init__(self, bert_config: dict[str, Any], special_token_ids: dict[str, int], gene_token_ids: list[int],
                 masking: dict[str, float] | None = None, tokenizer: dict[str, Any] | None = None,
                 optimizer: dict[str, Any] | None = None, scheduler: dict[str, Any] | None = None, seed: int = 0,
                 model: BertForMaskedLM | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"], logger=False)
        self.model = model if model is not None else with_masked_lm_head(bert_from_config(bert_config))
        self.rates = MaskingRates(**(masking or {}))
        self.mask_token_id = special_token_ids["<mask>"]
        self.protected_token_ids = sorted(
            special_token_ids[name] for name in ("<pad>", "<cls>", "<eos>") if name in special_token_ids)
        self.register_buffer("gene_token_ids", torch.tensor(gene_token_ids, dtype=torch.long), persistent=False)
        self.seed = seed
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()
        self.epoch_history: list[dict[str, float]] = []

    @property
    def bert(self) -> BertModel:
        return self.model.bert

    def _masked(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return mask_genes(batch["input_ids"], batch["attention_mask"], self.protected_token_ids, self.mask_token_id,
                          self.gene_token_ids, self.rates, generator)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids, labels = self._masked(batch)
        loss = self.model(input_ids=input_ids, attention_mask=batch["attention_mask"], labels=labels).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train/masked_loss is {loss.item()} at epoch {self.current_epoch + 1}, step "
                                     f"{self.global_step}: training diverged; lower optimizer.lr")
        self.log("train/masked_loss", loss, on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # The same masks every epoch (a generator seeded by the batch alone), so epochs compare.
        generator = torch.Generator().manual_seed(step_seed(self.seed, VALIDATION_STREAM, batch_idx, self.global_rank))
        input_ids, labels = self._masked(batch, generator)
        logits = self.model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits
        chosen = labels != IGNORED
        if not chosen.any():
            return
        loss = nn.functional.cross_entropy(logits[chosen].float(), labels[chosen])
        correct = (logits[chosen].argmax(-1) == labels[chosen]).float().mean()
        self.val_loss.update(loss, weight=int(chosen.sum()))
        self.val_accuracy.update(correct, weight=int(chosen.sum()))

    def on_validation_epoch_end(self) -> None:
        values = {"masked_loss": self.val_loss.compute().item(), "masked_accuracy": self.val_accuracy.compute().item()}
        self.val_loss.reset()
        self.val_accuracy.reset()
        self.log_dict({f"{VAL}/{name}": value for name, value in values.items()})
        self.results = {VAL: values}
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.epoch_history.append({"epoch": self.current_epoch, **{f"{VAL}/{k}": v for k, v in values.items()}})
