"""Token masking and mixup: what they may touch, how often, and repeatability."""

from __future__ import annotations

import pytest
import torch

from geneformer_colon.common.errors import InputError
from geneformer_colon.model.augment import BatchAugment, mask_tokens, mixup

PAD, MASK, CLS, EOS = 0, 1, 2, 3


def v2_batch(n_cells: int = 400, length: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """V2-style cells: <cls> genes... <eos>, then padding to the batch length."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, length + 1, (n_cells,), generator=g)
    positions = torch.arange(length)
    attention_mask = (positions < lengths[:, None]).long()
    input_ids = torch.randint(4, 1000, (n_cells, length), generator=g)
    input_ids[:, 0] = CLS
    input_ids[torch.arange(n_cells), lengths - 1] = EOS
    input_ids[attention_mask == 0] = PAD
    return input_ids, attention_mask


def test_mask_tokens_never_touches_pad_cls_eos_and_rate() -> None:
    input_ids, attention_mask = v2_batch()
    original = input_ids.clone()
    g = torch.Generator().manual_seed(1)
    masked = mask_tokens(input_ids, attention_mask, 0.15, MASK, (CLS, EOS), generator=g)
    assert torch.equal(input_ids, original), "input must not be modified in place"
    changed = masked != input_ids
    assert (masked[changed] == MASK).all()
    is_gene = (attention_mask == 1) & (input_ids != CLS) & (input_ids != EOS)
    assert not changed[~is_gene].any()
    assert torch.equal(masked[~is_gene], input_ids[~is_gene])
    n_genes = int(is_gene.sum())
    rate = changed.sum().item() / n_genes
    sd = (0.15 * 0.85 / n_genes) ** 0.5
    assert abs(rate - 0.15) < 5 * sd, (rate, n_genes)
    # Every cell is masked independently: some cells have masks at different positions.
    assert changed.any(dim=1).float().mean() > 0.5


def test_mask_tokens_v1_pad_only_and_extremes() -> None:
    input_ids, attention_mask = v2_batch(n_cells=50, seed=3)
    input_ids[:, 0] = 50  # V1: no special tokens but padding
    input_ids[attention_mask == 0] = PAD
    everything = mask_tokens(input_ids, attention_mask, 1.0, MASK, ())
    assert torch.equal(everything, torch.where(attention_mask.bool(), MASK, PAD))
    same = mask_tokens(input_ids, attention_mask, 0.0, MASK, ())
    assert torch.equal(same, input_ids) and same.data_ptr() != input_ids.data_ptr()


def test_mask_tokens_seeded() -> None:
    input_ids, attention_mask = v2_batch(n_cells=20)
    draws = [
        mask_tokens(input_ids, attention_mask, 0.3, MASK, (CLS, EOS), torch.Generator().manual_seed(seed))
        for seed in (7, 7, 8)
    ]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def batch_for_mixup(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(n, 16, generator=g)
    targets = torch.nn.functional.one_hot(torch.randint(0, 3, (n,), generator=g), 3).float()
    return embeddings, targets


def test_mixup_p0_untouched() -> None:
    embeddings, targets = batch_for_mixup()
    e_copy, t_copy = embeddings.clone(), targets.clone()
    mixed, mixed_targets, lam = mixup(embeddings, targets, 0.0, 0.6, torch.Generator().manual_seed(0))
    assert lam == 1.0
    assert torch.equal(mixed, e_copy) and torch.equal(mixed_targets, t_copy)


def test_mixup_p1_convex_combinations() -> None:
    embeddings, targets = batch_for_mixup()
    lams = []
    for seed in range(20):
        mixed, mixed_targets, lam = mixup(
            embeddings, targets, 1.0, 0.6, torch.Generator().manual_seed(seed)
        )
        assert 0.0 <= lam <= 1.0
        lams.append(lam)
        torch.testing.assert_close(mixed_targets.sum(dim=1), torch.ones(len(targets)))
        # Each output row is lam * row_i + (1 - lam) * row_j for one j, the js forming a permutation.
        partners = []
        for i in range(len(embeddings)):
            candidates = lam * embeddings[i] + (1 - lam) * embeddings
            errors = (candidates - mixed[i]).abs().amax(dim=1)
            j = int(errors.argmin())
            assert errors[j] < 1e-5, (seed, i)
            torch.testing.assert_close(mixed_targets[i], lam * targets[i] + (1 - lam) * targets[j])
            partners.append(j)
        assert sorted(partners) == list(range(len(embeddings))) or lam > 0.999
    # Beta(0.6, 0.6) is U-shaped with mean 0.5: draws spread over [0, 1], not a constant.
    assert min(lams) < 0.3 and max(lams) > 0.7


def test_mixup_probability_and_seed() -> None:
    embeddings, targets = batch_for_mixup()
    g = torch.Generator().manual_seed(5)
    fired = sum(mixup(embeddings, targets, 0.3, 0.6, g)[2] != 1.0 for _ in range(400))
    assert 80 <= fired <= 160  # Binomial(400, 0.3): mean 120, sd 9
    first = mixup(embeddings, targets, 1.0, 0.6, torch.Generator().manual_seed(9))
    again = mixup(embeddings, targets, 1.0, 0.6, torch.Generator().manual_seed(9))
    assert first[2] == again[2] and torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_mixup_gradient_flows_to_both_rows() -> None:
    embeddings, targets = batch_for_mixup(4)
    embeddings.requires_grad_(True)
    mixed, _, lam = mixup(embeddings, targets, 1.0, 0.6, torch.Generator().manual_seed(2))
    mixed.sum().backward()
    # Every row is used once as itself (lam) and once as a partner (1 - lam).
    torch.testing.assert_close(embeddings.grad, torch.ones_like(embeddings))


def test_batch_augment_wraps_and_validates() -> None:
    augment = BatchAugment(token_mask_prob=0.2, mixup_prob=1.0, mixup_alpha=0.6)
    input_ids, attention_mask = v2_batch(n_cells=10)
    torch.testing.assert_close(
        augment.mask(input_ids, attention_mask, MASK, (CLS, EOS), torch.Generator().manual_seed(4)),
        mask_tokens(input_ids, attention_mask, 0.2, MASK, (CLS, EOS), torch.Generator().manual_seed(4)),
    )
    embeddings, targets = batch_for_mixup()
    mixed, mixed_targets = augment.mix(embeddings, targets, torch.Generator().manual_seed(4))
    theirs = mixup(embeddings, targets, 1.0, 0.6, torch.Generator().manual_seed(4))
    assert theirs[2] != 1.0
    assert torch.equal(mixed, theirs[0]) and torch.equal(mixed_targets, theirs[1])
    untouched = BatchAugment(mixup_prob=0.0).mix(embeddings, targets)
    assert untouched[0] is embeddings and untouched[1] is targets

    assert BatchAugment() == BatchAugment(token_mask_prob=0.0, mixup_prob=0.0, mixup_alpha=0.6)
    for kwargs, key in [
        ({"token_mask_prob": 1.5}, "augment.token_mask_prob"),
        ({"mixup_prob": -0.1}, "augment.mixup_prob"),
        ({"mixup_alpha": 0.0}, "augment.mixup_alpha"),
    ]:
        with pytest.raises(InputError, match=key):
            BatchAugment(**kwargs)


@pytest.mark.parametrize("same_class", [False, True])
def test_mixup_across_donors_pairs_cells_of_two_donors(same_class):
    n = 40
    g = torch.Generator().manual_seed(1)
    donors, labels = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    augment = BatchAugment(mixup_prob=1.0, mixup_alpha=0.6, mixup_across_donors=True, mixup_same_class=same_class)
    for seed in range(5):
        mixed, _ = augment.mix(torch.eye(n), torch.zeros(n, 3), torch.Generator().manual_seed(seed), donors, labels)
        for row in range(n):
            partners = [int(j) for j in torch.nonzero(mixed[row]).flatten() if j != row]
            if mixed[row, row] == 1:  # no eligible partner in the batch: left as it was
                continue
            (partner,) = partners
            assert donors[partner] != donors[row]
            if same_class:
                assert labels[partner] == labels[row]
