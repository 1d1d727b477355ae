"""Batch samplers: class/donor balancing, length grouping, token budgets, disjoint shares per rank.

Every epoch's batches are a pure function of (seed, epoch, rank, world size), so a resumed run
draws exactly the batches an uninterrupted one would have drawn, and a run resumed in the
middle of an epoch skips the batches it had already trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from geneformer_colon.common.errors import InputError
from geneformer_colon.data.token_rows import padded_length

BALANCE_STRATEGIES = ("none", "class", "class_donor")


def _balancing_weights(strategy: str, labels: np.ndarray, donors: np.ndarray) -> np.ndarray:
    """Per-cell draw probabilities making each class (or each class-donor pair) equally likely."""
    groups = labels if strategy == "class" else np.char.add(labels.astype(str), "\0" + donors.astype(str))
    _, group_of_cell, group_sizes = np.unique(groups, return_inverse=True, return_counts=True)
    weights = 1.0 / (group_sizes[group_of_cell] * len(group_sizes))
    return weights / weights.sum()


def _chunks(indices: np.ndarray, size: int) -> list[np.ndarray]:
    return [indices[start : start + size] for start in range(0, len(indices), size)]


def pack_by_tokens(by_length: np.ndarray, lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Cut cells sorted longest first into batches whose padded size (cells x longest, rounded up as the model
    pads it: :func:`padded_length`) fits ``max_tokens``.

    A cell longer than the budget is a batch of its own.
    """
    batches = []
    start = 0
    while start < len(by_length):
        longest = int(padded_length(max(int(lengths[by_length[start]]), 1)))
        size = max(1, max_tokens // longest)
        batches.append(by_length[start : start + size])
        start += size
    return batches


def _split_to(batches: list[np.ndarray], count: int) -> list[np.ndarray]:
    """Halve the largest batches until there are ``count`` (a shorter epoch's plan made as long as the longest)."""
    batches = list(batches)
    while len(batches) < count:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        batch = batches.pop(largest)
        half = (len(batch) + 1) // 2
        batches[largest:largest] = [batch[:half], batch[half:]]
    return batches


class TrainBatchSampler(Sampler[list[int]]):
    """Yields training batches of dataset positions, grouped by length for every strategy.

    Each epoch first draws its cells: ``none`` takes every cell once in a random order;
    ``class`` and ``class_donor`` draw with replacement so each class (or class-donor pair) is
    equally likely, as many draws as cells. The drawn cells are then cut into mega-batches of
    ``batch_size * mega_batch_factor`` cells, each sorted by length and cut into batches (of
    ``batch_size`` cells, or as many as fit ``max_tokens`` padded tokens), and the batches'
    order is shuffled: batches pad little while the epoch's draws keep their balance.

    With a token budget the number of batches would vary with each epoch's draws; every epoch's
    plan is made as long as the longest of the ``epochs`` epochs of training (on any rank) by
    halving its largest batches, so the number of steps, the learning-rate schedule and gradient
    accumulation are known before training.

    Under DDP each rank takes a disjoint share of the cells (a seeded permutation, every
    ``world_size``-th cell) and samples only from it; all ranks have the same number of batches.
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
        max_tokens: int | None = None,
        epochs: int = 1,
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
        self.max_tokens = max_tokens
        self.epochs = epochs
        self.epoch = 0
        self.share_size = len(self.labels) // world_size
        self.skip = 0
        if max_tokens is None:
            self.n_batches = math.ceil(self.share_size / batch_size)
        else:
            self.n_batches = max(len(self._grouped(epoch, rank)) for epoch in range(max(epochs, 1))
                                 for rank in range(world_size))

    @property
    def sampler(self) -> TrainBatchSampler:
        """Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``: that is this object."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_batches

    def epoch_indices(self, epoch: int | None = None, rank: int | None = None) -> np.ndarray:
        """A rank's cells for an epoch (default: this rank, the current epoch), in draw order."""
        epoch = self.epoch if epoch is None else epoch
        rank = self.rank if rank is None else rank
        rng = np.random.default_rng([self.seed, epoch])
        share = rng.permutation(len(self.labels))[rank :: self.world_size][: self.share_size]
        if self.strategy == "none":
            return rng.permutation(share)
        weights = _balancing_weights(self.strategy, self.labels[share], self.donors[share])
        return rng.choice(share, size=len(share), replace=True, p=weights)

    def _grouped(self, epoch: int, rank: int) -> list[np.ndarray]:
        """The drawn cells cut into length-sorted batches, mega-batch by mega-batch (before shuffling)."""
        indices = self.epoch_indices(epoch, rank)
        batches: list[np.ndarray] = []
        for mega in _chunks(indices, self.batch_size * self.mega_batch_factor):
            by_length = mega[np.argsort(-self.lengths[mega], kind="stable")]
            if self.max_tokens is None:
                batches.extend(_chunks(by_length, self.batch_size))
            else:
                batches.extend(pack_by_tokens(by_length, self.lengths, self.max_tokens))
        return batches

    def epoch_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's batches of an epoch (default: the current one), in the order they are yielded."""
        epoch = self.epoch if epoch is None else epoch
        batches = _split_to(self._grouped(epoch, self.rank), self.n_batches)
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
        return [batches[position] for position in order]

    def __iter__(self) -> Iterator[list[int]]:
        start, self.skip = self.skip, 0
        for batch in self.epoch_batches()[start:]:
            yield batch.tolist()


class EvalBatchSampler(Sampler[list[int]]):
    """Evaluation batches sorted by length (little padding); rank r takes every r-th batch.

    Batches hold ``batch_size`` cells, or with ``max_tokens`` as many as fit that many padded
    tokens. A split is cut into at least as many batches as there are ranks (when it has that
    many cells), so no rank is left without a batch to wait in the others' gathers.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1,
                 max_tokens: int | None = None) -> None:
        lengths = np.asarray(lengths)
        by_length = np.argsort(-lengths, kind="stable")
        if max_tokens is not None:
            batches = pack_by_tokens(by_length, lengths, max_tokens)
        else:
            batches = _chunks(by_length, batch_size)
        if len(batches) < world_size:
            batches = np.array_split(by_length, min(world_size, len(by_length)))
        self.batches = [batch.tolist() for batch in batches][rank::world_size]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)
