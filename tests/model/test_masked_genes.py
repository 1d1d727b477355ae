"""Masked-gene pretraining's objective (masked_genes.py): the masking's statistics follow Geneformer's (BERT's)."""

from __future__ import annotations

import pytest
import torch

from geneformer_colon.common.errors import InputError
from geneformer_colon.model.masked_genes import IGNORED, MaskingRates, mask_genes


def test_masking_statistics_follow_geneformer():
    generator = torch.Generator().manual_seed(0)
    cells, length = 400, 200
    input_ids = torch.randint(4, 1000, (cells, length), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 2, 3  # <cls> ... <eos>
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::2, 150:] = 0  # padding
    input_ids[attention_mask == 0] = 0
    genes = torch.arange(4, 1000)
    masked, labels = mask_genes(input_ids, attention_mask, [0, 2, 3], 1, genes, MaskingRates(), generator)

    is_gene = (attention_mask == 1) & (input_ids > 3)
    chosen = labels != IGNORED
    assert not chosen[~is_gene].any()  # <pad>, <cls>, <eos> are never chosen
    assert (labels[chosen] == input_ids[chosen]).all() and (labels[~chosen] == IGNORED).all()
    assert (masked[~chosen] == input_ids[~chosen]).all()  # what is not chosen is left as it was
    share = chosen.sum() / is_gene.sum()
    assert abs(share - 0.15) < 0.005
    to_mask = (masked[chosen] == 1).float().mean()
    kept = (masked[chosen] == input_ids[chosen]).float().mean()
    assert abs(to_mask - 0.8) < 0.01 and abs(kept - 0.1 - 0.1 / 996) < 0.01  # a random gene may be the same one
    replaced = chosen & (masked != 1) & (masked != input_ids)
    assert ((masked[replaced] >= 4) & (masked[replaced] < 1000)).all()
    with pytest.raises(InputError, match="pretrain.masking.mask"):
        MaskingRates(mask=0.95, random=0.1)
