"""How the verbs that run a trained model over cells (predict, embed, perturb, explain) cut them into forward
passes, and on which device.

- ``--device auto`` (the default): the GPU when there is one, else the CPU.
- Batches hold as many cells as fit ``--max-tokens`` padded tokens (cells x longest cell), by default
  :data:`DEFAULT_CELLS` cells of the model's input size; ``--batch-size N`` asks for N cells a batch instead.
- On a CUDA out-of-memory the batch is cut in half and retried, and every later batch of the command is cut to
  that size too, with one log line a halving (:class:`OomHalving`, the one place every verb's forward and
  gradient passes go through).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from geneformer_colon.common.errors import InputError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Cells of the model's full input size in the default token budget: as many as the verbs' batches held by count.
DEFAULT_CELLS = 64
# explain's passes keep activations for their gradients (x its --steps): a quarter of that.
DEFAULT_EXPLAIN_CELLS = 16


def resolve_device(device: str) -> str:
    """``auto``: ``cuda`` when a GPU is there, else ``cpu``; any other name as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def token_budget(batch_size: int | None, max_tokens: int | None, input_size: int, cells: int = DEFAULT_CELLS
                 ) -> tuple[int, int | None]:
    """(cells a batch, padded tokens a batch or None: batches by cells): ``max_tokens`` when given; else
    ``batch_size`` cells when given; else ``cells`` cells of the model's ``input_size`` in tokens. Its own answer
    given back gives the same answer."""
    if max_tokens is not None:
        return batch_size or cells, max_tokens
    if batch_size is not None:
        return batch_size, None
    return cells, cells * input_size


@dataclass
class OomHalving:
    """A command's batches, halved on a CUDA out-of-memory: the batch that ran out is cut in two and each part
    retried, and every later batch is cut to that size too (``limit``), one log line a halving. A single cell
    that does not fit is one clear error."""

    limit: int | None = None

    def __call__(self, step: Callable[[slice], T], rows: int) -> list[T]:
        """``step`` over slices of ``rows`` rows of at most ``limit`` rows, in order; their results."""
        results: list[T] = []
        start = 0
        while start < rows:
            part = slice(start, min(rows, start + (self.limit or rows)))
            try:
                results.append(step(part))
            except torch.cuda.OutOfMemoryError:
                size = part.stop - part.start
                if size == 1:
                    raise InputError("out of GPU memory on one cell alone; use a GPU with more memory, or "
                                     "--device cpu") from None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.limit = (size + 1) // 2
                log.warning("out of GPU memory on a batch of %d cells: retrying in batches of %d (every later batch "
                            "too)", size, self.limit)
                continue
            start = part.stop
        return results
