"""Cells as rows of token ids: one flat array and its offsets, the layout the tokenizer returns and the
token store keeps (cell i is ``tokens[offsets[i]:offsets[i + 1]]``), and a batch of cells padded to its
longest, the one form a model takes them in."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# A batch's length is padded to a multiple of this: tensor-core tiles, and SDPA's memory-efficient kernel takes a
# (batch, 1, 1, L) mask as it is only when L is a multiple of 8 (its bias rows aligned; else it makes a padded copy).
PAD_MULTIPLE = 8


def padded_length(length: int | np.ndarray, multiple: int = PAD_MULTIPLE) -> int | np.ndarray:
    """``length`` rounded up to a multiple of ``multiple`` (what a batch of that longest cell costs on a GPU)."""
    return -(-length // multiple) * multiple


def pad_tokens(cells: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` (cells x the longest cell, ``pad_id`` after each cell's end) and ``attention_mask``
    (1 on the real tokens). An item is one cell's tokens, or a 2-D block of cells of one length (the
    perturbed variants of a cell)."""
    blocks = [np.atleast_2d(np.asarray(cell, dtype=np.int64)) for cell in cells]
    longest = max(block.shape[1] for block in blocks)
    input_ids = torch.full((sum(len(block) for block in blocks), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(input_ids.shape, dtype=torch.long)
    row = 0
    for block in blocks:
        input_ids[row : row + len(block), : block.shape[1]] = torch.from_numpy(block)
        attention_mask[row : row + len(block), : block.shape[1]] = 1
        row += len(block)
    return input_ids, attention_mask


class TokenRows:
    """What a holder of ``tokens`` and ``offsets`` answers: a cell's tokens, lengths, a padded batch."""

    tokens: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def cell_tokens(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    def padded(self, rows: Sequence[int] | np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cells at ``rows`` as one batch: see :func:`pad_tokens`."""
        return pad_tokens([self.cell_tokens(int(row)) for row in rows], pad_id)
