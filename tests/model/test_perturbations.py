"""Combinations and anchored pairs build the token lists upstream Geneformer's InSilicoPerturber builds
(perturber_utils: delete_indices, overexpress_indices(_special), overexpress_tokens; the cells it keeps), written out
by hand here for V1 (no special tokens) and V2 (<cls> first, <eos> last)."""

from __future__ import annotations

import numpy as np
import pytest

from geneformer_colon.model.perturbations import anchored_pairs, combinations, perturbed_tokens

CLS, EOS = 2, 3


@pytest.mark.parametrize("framed", [False, True])
def test_pairs_and_anchored_pairs_are_upstreams_token_lists(framed):
    def cell(*genes: int) -> list[int]:
        return [CLS, *genes, EOS] if framed else list(genes)

    def made(genes, kind, rule, input_size=20):
        variant = perturbed_tokens(np.array(cell(10, 11, 12, 13)), genes, kind, input_size, framed, rule)
        return None if variant is None else variant.tolist()

    # a pair of a list (upstream: tokens_to_perturb, perturbed as a group)
    assert made([11, 13], "delete", "combo") == cell(10, 12)
    assert made([11, 99], "delete", "combo") is None  # upstream keeps only cells holding every gene to delete
    assert made([13, 11], "overexpress", "combo") == cell(13, 11, 10, 12)  # to the front, in the list's order
    assert made([99, 11], "overexpress", "combo") == cell(99, 11, 10, 12, 13)  # a gene the cell lacks inserted
    full = len(cell(10, 11, 12, 13))
    assert made([99, 11], "overexpress", "combo", full) == cell(99, 11, 10, 12)  # the last gene drops, <eos> stays
    # an anchor (12) with another gene of the cell: upstream's sorted pair of indices
    assert made([12, 10], "delete", "anchored") == cell(11, 13)
    assert made([12, 10], "overexpress", "anchored") == cell(10, 12, 11, 13)  # in their order in the cell
    assert made([12, 13], "overexpress", "anchored") == cell(12, 13, 10, 11)
    assert made([12, 99], "delete", "anchored") is None  # upstream pairs the anchor with the cell's own genes
    assert made([12, 99], "overexpress", "anchored") is None
    assert made([98, 10], "delete", "anchored") is None  # a cell without the anchor is left out


def test_k_genes_of_a_list_make_n_choose_k_groups():
    assert combinations([5, 6, 7, 8], 2) == [(5, 6), (5, 7), (5, 8), (6, 7), (6, 8), (7, 8)]
    assert len(combinations(range(9), 2)) == 9 * 8 // 2 and len(combinations(range(6), 3)) == 20
    assert anchored_pairs(6, [5, 6, 7]) == [(6, 5), (6, 7)]
