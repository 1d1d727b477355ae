"""Training-time augmentation: gene-token masking on the input, mixup on the pooled cell vectors.

Every random draw goes through the optional ``torch.Generator`` (on the CPU or on the data's
device), so a seeded generator makes runs repeatable; results are moved to the data's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from geneformer_colon.common.errors import InputError


def _draw_device(generator: torch.Generator | None, data: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else data.device


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prob: float,
    mask_token_id: int,
    protected_ids: Sequence[int],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A copy of ``input_ids``, each gene token replaced by ``mask_token_id`` with probability ``prob``.

    Gene tokens are the attended positions (``attention_mask == 1``) whose id is not in
    ``protected_ids`` (``<cls>``, ``<eos>``, ...): padding and special tokens are never masked.
    """
    if prob == 0:
        return input_ids.clone()
    protected = torch.tensor(list(protected_ids), dtype=input_ids.dtype, device=input_ids.device)
    is_gene = attention_mask.bool() & ~torch.isin(input_ids, protected)
    device = _draw_device(generator, input_ids)
    draw = torch.rand(input_ids.shape, generator=generator, device=device).to(input_ids.device)
    return input_ids.masked_fill(is_gene & (draw < prob), mask_token_id)


def mixup_partners(allowed: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each row's partner, drawn uniformly among the columns ``allowed`` [B, B] marks for it; a row with
    no allowed column is its own partner (mixing it changes nothing)."""
    device = _draw_device(generator, allowed)
    draw = torch.rand(allowed.shape, generator=generator, device=device).to(allowed.device)
    partner = torch.where(allowed, draw, -1.0).argmax(dim=1)
    own = torch.arange(len(allowed), device=allowed.device)
    return torch.where(allowed.any(dim=1), partner, own)


def mixup(
    embeddings: torch.Tensor,
    soft_targets: torch.Tensor,
    prob: float,
    alpha: float,
    generator: torch.Generator | None = None,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup of cell vectors [B, H] and their soft targets [B, C], with probability ``prob``.

    When the batch is mixed: ``lam ~ Beta(alpha, alpha)``, each row's partner ``pi`` (a random
    permutation of the batch; with ``allowed`` [B, B], a row drawn among those it may be mixed with:
    :func:`mixup_partners`), and the result is ``(lam * e + (1 - lam) * e[pi], lam * y + (1 - lam) * y[pi],
    lam)``. Otherwise the inputs come back untouched with ``lam = 1.0``.
    """
    if prob == 0:
        return embeddings, soft_targets, 1.0
    device = _draw_device(generator, embeddings)
    if torch.rand((), generator=generator, device=device).item() >= prob:
        return embeddings, soft_targets, 1.0
    # Beta(a, a) as X / (X + Y) with X, Y ~ Gamma(a), in float64 so that tiny alphas rarely
    # underflow both draws; if they do, lam = 0 (a valid point of Beta's support).
    gammas = torch._standard_gamma(
        torch.full((2,), alpha, dtype=torch.float64, device=device), generator=generator
    )
    lam = (gammas[0] / gammas.sum().clamp_min(torch.finfo(torch.float64).tiny)).item()
    if allowed is None:
        perm = torch.randperm(len(embeddings), generator=generator, device=device).to(embeddings.device)
    else:
        perm = mixup_partners(allowed, generator)
    mixed = lam * embeddings + (1 - lam) * embeddings[perm]
    mixed_targets = lam * soft_targets + (1 - lam) * soft_targets[perm]
    return mixed, mixed_targets, lam


@dataclass
class BatchAugment:
    """The ``augment`` config group: how often to mask gene tokens and to mix batches.

    The module applies it in training steps only. ``mixup_across_donors``: a cell's mixup partner is a
    cell of another donor; ``mixup_same_class``: of the same class.
    """

    token_mask_prob: float = 0.0
    mixup_prob: float = 0.0
    mixup_alpha: float = 0.6
    mixup_across_donors: bool = False
    mixup_same_class: bool = False

    def __post_init__(self) -> None:
        for key in ("token_mask_prob", "mixup_prob"):
            value = getattr(self, key)
            if not 0 <= value <= 1:
                raise InputError(f"augment.{key} is {value}; set it to a probability in [0, 1]")
        if not self.mixup_alpha > 0:
            raise InputError(f"augment.mixup_alpha is {self.mixup_alpha}; set it to a number > 0")

    def mask(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask_token_id: int,
        protected_ids: Sequence[int],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """:func:`mask_tokens` with ``prob = token_mask_prob``."""
        return mask_tokens(
            input_ids, attention_mask, self.token_mask_prob, mask_token_id, protected_ids, generator
        )

    def mix(
        self,
        embeddings: torch.Tensor,
        soft_targets: torch.Tensor,
        generator: torch.Generator | None = None,
        donors: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`mixup` with ``prob = mixup_prob`` and ``alpha = mixup_alpha``, without lambda; partners
        of other ``donors`` and of the same ``labels`` (class indices) when asked.

        The mixed soft targets already carry lambda, which is all the loss needs.
        """
        allowed = None
        if self.mixup_across_donors or self.mixup_same_class:
            allowed = torch.ones(len(embeddings), len(embeddings), dtype=torch.bool, device=embeddings.device)
            if self.mixup_across_donors:
                allowed &= donors[:, None] != donors[None, :]
            if self.mixup_same_class:
                allowed &= labels[:, None] == labels[None, :]
            allowed.fill_diagonal_(False)
        mixed, mixed_targets, _ = mixup(
            embeddings, soft_targets, self.mixup_prob, self.mixup_alpha, generator, allowed
        )
        return mixed, mixed_targets
