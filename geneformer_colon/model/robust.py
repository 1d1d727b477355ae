"""Donor-robust training: the ``robust`` config group, one class a strategy behind one small interface.

The classifier's training step hands a strategy the batch's :class:`TrainingBatch` (the loss function,
the head's logits, the (mixed) soft targets, the pooled cell embeddings before mixup, each cell's
training-donor index and how far training has come) and trains on the loss it returns. A strategy
is an ``nn.Module``: its parameters train with the model's and its state (group DRO's donor weights)
travels in checkpoints, so a resumed run goes on exactly.

- :class:`PlainTraining` (``robust=none``): the loss as it is.
- :class:`GroupDRO` (``robust=group_dro``): group DRO over the training donors (Sagawa et al. 2020).
- :class:`DonorAdversary` (``robust=donor_adversary``): a donor classifier behind a gradient-reversal
  layer (Ganin et al. 2016).
- :class:`CoralAlignment` (``robust=coral``): Deep CORAL (Sun and Saenko 2016) across training donors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from geneformer_colon.common.errors import InputError

LossFunction = Callable[..., torch.Tensor]  # (logits, targets, sample_weight=None) -> the batch's loss


@dataclass(frozen=True)
class TrainingBatch:
    """What a strategy sees of a training step. ``donors``: each cell's index in the strategy's ``donors``;
    ``progress``: the share of the run's optimizer steps done, in [0, 1]."""

    loss: LossFunction
    logits: torch.Tensor
    targets: torch.Tensor
    embeddings: torch.Tensor
    donors: torch.Tensor
    progress: float


class DonorStrategy(nn.Module):
    """The interface: ``forward(batch)`` -> (the loss to train on, figures to log as the epoch's mean);
    ``epoch_figures()``: figures to log at the end of a training epoch. ``donors``: the training donors."""

    def __init__(self, donors: Sequence[str], hidden_size: int) -> None:
        super().__init__()
        self.donors = list(donors)
        self.hidden_size = hidden_size

    def forward(self, batch: TrainingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return batch.loss(batch.logits, batch.targets), {}

    def epoch_figures(self) -> dict[str, float]:
        return {}


class PlainTraining(DonorStrategy):
    """``robust=none``: no donor-robust term."""


def _checked(value: float, key: str, expected: str, valid: Callable[[float], bool]) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and valid(value)):
        raise InputError(f"robust.{key} is {value!r}; set it to {expected}")
    return float(value)


def _summed_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over DDP ranks (the tensor itself in a single process)."""
    if dist.is_available() and dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


class GroupDRO(DonorStrategy):
    """A weight per training donor ``q``, raised by exponentiated gradient on that donor's loss in each
    batch (``q_d <- q_d exp(step_size * loss_d)``, normalised); each cell's loss is weighted by its donor's
    ``q_d / max(q)``. With ``step_size=0`` the weights stay equal and the loss is the plain loss exactly.

    The donors' losses are summed over DDP ranks before the update, so every rank keeps the same weights.
    The loss is Sagawa et al.'s ``sum_d q_d loss_d`` where the batch holds each donor equally (class_donor
    sampling); otherwise each donor counts by its cells in the batch as well as by its weight.
    """

    weights: torch.Tensor

    def __init__(self, donors: Sequence[str], hidden_size: int, step_size: float = 0.01) -> None:
        super().__init__(donors, hidden_size)
        self.step_size = _checked(step_size, "step_size", "a number >= 0", lambda v: v >= 0)
        self.register_buffer("weights", torch.full((len(self.donors),), 1.0 / len(self.donors), dtype=torch.float64))

    def forward(self, batch: TrainingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.training and self.step_size > 0:
            with torch.no_grad():
                losses, present = self._donor_losses(batch)
                self.weights[present] *= torch.exp(self.step_size * losses[present])
                self.weights /= self.weights.sum()
        relative = (self.weights / self.weights.max()).to(batch.logits.dtype)
        return batch.loss(batch.logits, batch.targets, sample_weight=relative[batch.donors]), {}

    def _donor_losses(self, batch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Each donor's mean loss in the batch (all ranks' cells) and which donors had cells."""
        sums = torch.zeros(len(self.donors), 2, dtype=torch.float64, device=batch.logits.device)
        for donor in batch.donors.unique().tolist():
            rows = batch.donors == donor
            sums[donor, 0] = batch.loss(batch.logits[rows], batch.targets[rows]).double() * rows.sum()
            sums[donor, 1] = rows.sum()
        sums = _summed_over_ranks(sums)
        present = sums[:, 1] > 0
        return sums[:, 0] / sums[:, 1].clamp_min(1), present

    def epoch_figures(self) -> dict[str, float]:
        return {f"robust/dro_weight/{donor}": float(w) for donor, w in zip(self.donors, self.weights.tolist())}


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, inputs: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return inputs.view_as(inputs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.strength * grad, None


def reverse_gradient(inputs: torch.Tensor, strength: float) -> torch.Tensor:
    """The identity forward; backward, the gradient times ``-strength`` (the gradient-reversal layer)."""
    return _ReverseGradient.apply(inputs, strength)


def reversal_schedule(progress: float, gamma: float = 10.0) -> float:
    """Ganin et al.'s warm-up of the reversal strength: ``2 / (1 + exp(-gamma p)) - 1``, from 0 to ~1."""
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


class DonorAdversary(DonorStrategy):
    """A donor classifier (hidden layer, ReLU, one logit a training donor) on the pooled embedding behind a
    gradient-reversal layer: the loss is ``loss + weight * donor_loss``, and the encoder receives the donor
    loss's gradient reversed and scaled by ``reversal_schedule(progress)`` (``schedule_gamma``; a run
    resumed at a step has the same progress, so the same strength). The head learns to tell the donors
    apart while the encoder learns to hide them; its accuracy on the training cells is logged
    (``robust/donor_accuracy``, chance is one over the donors). ``weight=0``: the plain run exactly.
    """

    def __init__(self, donors: Sequence[str], hidden_size: int, weight: float = 0.1, schedule_gamma: float = 10.0
                 ) -> None:
        super().__init__(donors, hidden_size)
        self.weight = _checked(weight, "weight", "a number >= 0", lambda v: v >= 0)
        self.schedule_gamma = _checked(schedule_gamma, "schedule_gamma", "a number >= 0", lambda v: v >= 0)
        self.donor_head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(),
                                        nn.Linear(hidden_size, len(self.donors)))

    def forward(self, batch: TrainingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        term, figures = self.donor_term(batch.embeddings, batch.donors, batch.progress)
        return batch.loss(batch.logits, batch.targets) + term, figures

    def donor_term(self, embeddings: torch.Tensor, donors: torch.Tensor, progress: float, prefix: str = "robust"
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``weight * donor_loss`` of these embeddings (each cell's index in ``donors``), and its figures logged
        as ``<prefix>/donor_accuracy`` and ``<prefix>/donor_loss``."""
        strength = reversal_schedule(progress, self.schedule_gamma)
        donor_logits = self.donor_head(reverse_gradient(embeddings, strength))
        donor_loss = F.cross_entropy(donor_logits.float(), donors)
        accuracy = (donor_logits.argmax(dim=-1) == donors).float().mean()
        return self.weight * donor_loss, {f"{prefix}/donor_accuracy": accuracy,
                                          f"{prefix}/donor_loss": donor_loss.detach()}


def coral_penalty(embeddings: torch.Tensor, donors: torch.Tensor) -> torch.Tensor:
    """Deep CORAL across donors: the mean over pairs of donors with two cells or more in the batch of
    ``|mean_a - mean_b|^2 + |cov_a - cov_b|_F^2 / (4 h^2)`` (``h``: the embedding size); 0 below two donors."""
    groups = [embeddings[donors == donor] for donor in donors.unique().tolist()]
    stats = [(rows.mean(dim=0), torch.cov(rows.T, correction=1)) for rows in groups if len(rows) > 1]
    if len(stats) < 2:
        return embeddings.sum() * 0.0
    scale = 4.0 * embeddings.shape[-1] ** 2
    terms = [(mean_a - mean_b).pow(2).sum() + (cov_a - cov_b).pow(2).sum() / scale
             for (mean_a, cov_a), (mean_b, cov_b) in combinations(stats, 2)]
    return torch.stack(terms).mean()


class CoralAlignment(DonorStrategy):
    """``loss + weight * coral_penalty`` on the pooled embeddings of the batch's training donors (the batch
    must hold several donors: ``data.balance_strategy=class_donor`` gives that). It has no parameters:
    its gradient reaches the encoder only, never the classifier head."""

    def __init__(self, donors: Sequence[str], hidden_size: int, weight: float = 0.01) -> None:
        super().__init__(donors, hidden_size)
        self.weight = _checked(weight, "weight", "a number >= 0", lambda v: v >= 0)

    def forward(self, batch: TrainingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        penalty = coral_penalty(batch.embeddings.float(), batch.donors)
        return batch.loss(batch.logits, batch.targets) + self.weight * penalty, {"robust/coral": penalty.detach()}
