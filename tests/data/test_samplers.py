from __future__ import annotations

import numpy as np
import pytest

from geneformer_colon.common.errors import InputError
from geneformer_colon.data.samplers import EvalBatchSampler, TrainBatchSampler


@pytest.fixture
def cells() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 6000
    labels = rng.choice(3, size=n, p=[0.7, 0.2, 0.1])
    donors = rng.choice(np.array(["KUL01", "KUL21", "KUL28", "KUL30"]), size=n, p=[0.55, 0.25, 0.15, 0.05])
    return {"labels": labels, "donors": donors, "lengths": rng.integers(50, 2048, size=n)}


def drawn(sampler: TrainBatchSampler) -> np.ndarray:
    return np.concatenate([np.asarray(batch) for batch in sampler])


def test_class_balance_draws_each_class_a_third(cells):
    sampler = TrainBatchSampler(**cells, batch_size=32, strategy="class", seed=1)
    indices = drawn(sampler)
    assert len(indices) == len(cells["labels"])  # an epoch is as long as the training set
    shares = np.bincount(cells["labels"][indices], minlength=3) / len(indices)
    np.testing.assert_allclose(shares, 1 / 3, atol=0.03)


def test_class_donor_balance_draws_each_pair_equally(cells):
    sampler = TrainBatchSampler(**cells, batch_size=32, strategy="class_donor", seed=1)
    indices = drawn(sampler)
    pairs = [f"{label}-{donor}" for label, donor in zip(cells["labels"][indices], cells["donors"][indices])]
    _, counts = np.unique(pairs, return_counts=True)
    assert len(counts) == 12
    np.testing.assert_allclose(counts / len(indices), 1 / 12, atol=0.02)


@pytest.mark.parametrize("strategy", ["none", "class", "class_donor"])
def test_same_seed_same_order_and_epochs_differ(cells, strategy):
    first = TrainBatchSampler(**cells, batch_size=32, strategy=strategy, seed=7)
    again = TrainBatchSampler(**cells, batch_size=32, strategy=strategy, seed=7)
    assert list(first) == list(again)
    order_epoch0 = list(first)
    first.set_epoch(1)
    assert list(first) != order_epoch0
    other_seed = TrainBatchSampler(**cells, batch_size=32, strategy=strategy, seed=8)
    assert list(other_seed) != order_epoch0


@pytest.mark.parametrize("strategy", ["none", "class", "class_donor"])
def test_ranks_draw_disjoint_shares_of_equal_length(cells, strategy):
    ranks = [TrainBatchSampler(**cells, batch_size=32, strategy=strategy, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(5)
    draws = [set(drawn(sampler).tolist()) for sampler in ranks]
    assert draws[0].isdisjoint(draws[1])
    assert len(ranks[0]) == len(ranks[1]) == len(list(ranks[0]))


def padding(cells, batches) -> int:
    return sum(int(cells["lengths"][b].max() * len(b) - cells["lengths"][b].sum()) for b in batches)


def test_none_visits_every_cell_once(cells):
    indices = drawn(TrainBatchSampler(**cells, batch_size=32, strategy="none", seed=0))
    assert sorted(indices.tolist()) == list(range(len(cells["labels"])))


@pytest.mark.parametrize("strategy", ["none", "class", "class_donor"])
def test_every_strategy_groups_by_length(cells, strategy):
    """Each batch pads little: far less than the same draws in random order (balance is kept: see above)."""
    sampler = TrainBatchSampler(**cells, batch_size=32, strategy=strategy, seed=0)
    batches = [np.asarray(batch) for batch in sampler]
    draws = np.random.default_rng(0).permutation(np.concatenate(batches))
    random_batches = [draws[i : i + 32] for i in range(0, len(draws), 32)]
    assert padding(cells, batches) < 0.2 * padding(cells, random_batches)
    assert sorted(len(batch) for batch in batches)[1:] == [32] * (len(batches) - 1)  # one short batch at most


@pytest.mark.parametrize("strategy", ["none", "class", "class_donor"])
def test_a_token_budget_is_never_exceeded_and_every_epoch_has_as_many_batches(cells, strategy):
    budget = 8192
    samplers = [TrainBatchSampler(**cells, batch_size=32, strategy=strategy, seed=2, max_tokens=budget, epochs=6,
                                  rank=rank, world_size=2) for rank in (0, 1)]
    counts = set()
    for epoch in range(6):
        for sampler in samplers:
            sampler.set_epoch(epoch)
            batches = list(sampler)
            counts.add(len(batches))
            assert all(len(batch) * cells["lengths"][batch].max() <= budget for batch in batches)
            assert len(drawn(sampler)) == sampler.share_size  # every draw of the epoch, none lost or repeated
    assert counts == {len(samplers[0])} == {len(samplers[1])}
    sizes = [len(batch) for batch in samplers[0]]
    assert max(sizes) > 3 * min(sizes)  # short cells share a batch, long ones do not


def test_skip_resumes_an_epoch_where_it_stopped(cells):
    sampler = TrainBatchSampler(**cells, batch_size=32, strategy="class_donor", seed=4)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.skip = 10
    assert list(sampler) == whole[10:]
    assert list(sampler) == whole  # the skip applies to one pass only


def test_set_epoch_reaches_the_sampler_the_way_lightning_calls_it(cells):
    from lightning_fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    sampler = TrainBatchSampler(**cells, batch_size=32, strategy="class", seed=0)
    loader = DataLoader(list(range(len(cells["labels"]))), batch_sampler=sampler)
    _set_sampler_epoch(loader, 3)
    assert sampler.epoch == 3


def test_eval_batches_cover_split_once_across_ranks(cells):
    shares = [EvalBatchSampler(cells["lengths"], 50, rank=r, world_size=2) for r in (0, 1)]
    seen = [i for sampler in shares for batch in sampler for i in batch]
    assert sorted(seen) == list(range(len(cells["lengths"])))


def test_eval_batches_under_a_token_budget_cover_the_split_once(cells):
    shares = [EvalBatchSampler(cells["lengths"], 50, rank=r, world_size=2, max_tokens=10_000) for r in (0, 1)]
    batches = [batch for sampler in shares for batch in sampler]
    assert sorted(i for batch in batches for i in batch) == list(range(len(cells["lengths"])))
    assert all(len(batch) * cells["lengths"][batch].max() <= 10_000 for batch in batches)


def test_a_small_split_still_gives_every_rank_a_batch():
    shares = [EvalBatchSampler(np.arange(3), 64, rank=r, world_size=2) for r in (0, 1)]
    assert all(len(sampler) == 1 for sampler in shares)
    assert sorted(i for sampler in shares for batch in sampler for i in batch) == [0, 1, 2]
    assert all(len(batch) <= 64 for batch in EvalBatchSampler(np.arange(200), 64)) and len(
        EvalBatchSampler(np.arange(200), 64)) == 4


def test_unknown_strategy_is_refused(cells):
    with pytest.raises(InputError, match="data.balance_strategy"):
        TrainBatchSampler(**cells, batch_size=32, strategy="donor")
