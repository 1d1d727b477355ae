"""Batch samplers: class/donor balancing, length grouping, and disjoint shares per rank.

Every epoch's order is a pure function of (seed, epoch, rank, world size), so a resumed run
draws exactly the batches an uninterrupted one would have drawn.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from geneformer_colon.errors import InputError

BALANCE_STRATEGIES = ("none", "class", "class_donor")


def _balancing_weights(strategy: str, labels: np.ndarray, donors: np.ndarray) -> np.ndarray:
    """Per-cell draw probabilities making each class (or each class-donor pair) equally likely."""
    groups = labels if strategy == "class" else np.char.add(labels.astype(str), "\0" + donors.astype(str))
    _, group_of_cell, group_sizes = np.unique(groups, return_inverse=True, return_counts=True)
    weights = 1.0 / (group_sizes[group_of_cell] * len(group_sizes))
    return weights / weights.sum()


def _chunks(indices: np.ndarray, size: int) -> list[np.ndarray]:
    return [indices[start : start + size] for start in range(0, len(indices), size)]


class TrainBatchSampler(Sampler[list[int]]):
    """Yields training batches of dataset positions.

    ``none`` shuffles and groups by length: mega-batches of ``batch_size * mega_batch_factor``
    cells are sorted by length and cut into batches, whose order is then shuffled, so each batch
    pads little. ``class`` and ``class_donor`` draw with replacement so each class (or
    class-donor pair) is equally likely; an epoch has as many draws as cells.

    Under DDP each rank first takes a disjoint share of the cells (a seeded permutation, every
    ``world_size``-th cell) and samples only from it, so ranks never see the same cell in an
    epoch and all ranks have the same number of batches.
    """

    def __init__(
        self,
        labels: np.ndarray,
        donors: np.ndarray,
        lengths: np.ndarray,
        batch_size: int,
        strategy: str = "none",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        mega_batch_factor: int = 50,
    ) -> None:
        if strategy not in BALANCE_STRATEGIES:
            raise InputError(f"data.balance_strategy={strategy!r}: choose one of {', '.join(BALANCE_STRATEGIES)}")
        self.labels = np.asarray(labels)
        self.donors = np.asarray(donors)
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.strategy = strategy
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.mega_batch_factor = mega_batch_factor
        self.epoch = 0
        self.share_size = len(self.labels) // world_size

    @property
    def sampler(self) -> TrainBatchSampler:
        """Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``: that is this object."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.share_size / self.batch_size)

    def epoch_indices(self) -> np.ndarray:
        """This rank's cells for the current epoch, in draw order (before batching)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        share = rng.permutation(len(self.labels))[self.rank :: self.world_size][: self.share_size]
        if self.strategy == "none":
            return rng.permutation(share)
        weights = _balancing_weights(self.strategy, self.labels[share], self.donors[share])
        return rng.choice(share, size=len(share), replace=True, p=weights)

    def __iter__(self) -> Iterator[list[int]]:
        indices = self.epoch_indices()
        if self.strategy != "none":
            yield from (batch.tolist() for batch in _chunks(indices, self.batch_size))
            return
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        batches = []
        for mega in _chunks(indices, self.batch_size * self.mega_batch_factor):
            by_length = mega[np.argsort(-self.lengths[mega], kind="stable")]
            batches.extend(_chunks(by_length, self.batch_size))
        for position in rng.permutation(len(batches)):
            yield batches[position].tolist()


class EvalBatchSampler(Sampler[list[int]]):
    """Evaluation batches sorted by length (little padding); rank r takes every r-th batch.

    A split is cut into at least as many batches as there are ranks (when it has that many
    cells), so no rank is left without a batch to wait in the others' gathers.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        by_length = np.argsort(-np.asarray(lengths), kind="stable")
        if math.ceil(len(by_length) / batch_size) < world_size:
            batches = np.array_split(by_length, min(world_size, len(by_length)))
        else:
            batches = _chunks(by_length, batch_size)
        self.batches = [batch.tolist() for batch in batches][rank::world_size]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)
