"""Cells without their labels: what an adaptation method may read of a target donor.

A :class:`UnlabelledCells` holds a split's store positions and donor indices only, never its label column, and
its batches (:func:`pad_unlabelled`) carry token ids, attention mask, store position and donor index: no label
reaches the code that adapts to a target donor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from geneformer_colon.data.store import TokenStore
from geneformer_colon.data.token_rows import pad_tokens, padded_length


class UnlabelledCells(Dataset):
    """Cells of a store by position, with their donor index (into the datamodule's ``donors``)."""

    def __init__(self, store: TokenStore, positions: np.ndarray, donor_ids: np.ndarray) -> None:
        self.store = store
        self.positions = np.asarray(positions)
        self.donor_ids = np.asarray(donor_ids)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return {"tokens": self.store.cell_tokens(int(self.positions[item])), "index": int(self.positions[item]),
                "donor": int(self.donor_ids[item])}

    def batch(self, rows: Sequence[int] | np.ndarray | torch.Tensor, pad_id: int = 0, max_tokens: int | None = None
              ) -> dict[str, torch.Tensor]:
        """The padded batch of these rows; with ``max_tokens``, of the first of them whose batch fits that many
        padded tokens (cells x the longest, counted as the samplers count it), one at least."""
        items = [self[int(row)] for row in rows]
        if max_tokens is not None:
            longest = np.maximum.accumulate([padded_length(max(len(item["tokens"]), 1)) for item in items])
            items = items[: max(1, int((np.arange(1, len(items) + 1) * longest <= max_tokens).sum()))]
        return pad_unlabelled(items, pad_id)


def pad_unlabelled(items: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad a batch to its own longest cell: token ids, attention mask, store position, donor index; no label."""
    input_ids, attention_mask = pad_tokens([item["tokens"] for item in items], pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
            "donors": torch.tensor([item["donor"] for item in items], dtype=torch.long)}
