"""Geneformer's perturbations of one cell's rank-value encoding (its gene tokens, most over-expressed first; V2
frames them with ``<cls>`` and ``<eos>``), as upstream's ``InSilicoPerturber`` (``perturber_utils``) defines them.

What is perturbed at once, a *rule* each:

- ``set`` (a gene, a ``--gene-set`` file, a GMT set): ``delete`` removes whichever of its genes the cell has (none:
  nothing to measure); ``overexpress`` puts them at the front (after ``<cls>``) in the set's order, inserting those
  the cell lacks; a cell then longer than the input size loses its last gene (V2 keeps ``<eos>``), as upstream's
  ``overexpress_tokens``.
- ``combo`` (``--combos K``: K genes of a list at once, upstream's ``genes_to_perturb`` list, perturbed as a group):
  ``delete`` needs every gene in the cell (upstream keeps only the cells holding all ``tokens_to_perturb``);
  ``overexpress`` as a set.
- ``anchored`` (``--anchor-gene G``: G with one other gene, upstream's ``combos=1`` with ``anchor_gene``): measured
  in a cell holding both (upstream keeps the cells with the anchor and pairs it with the cell's own genes); ``delete``
  removes both; ``overexpress`` moves both to the front in their order in the cell (upstream's
  ``overexpress_indices`` on the sorted pair of indices).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

RULES = ("set", "combo", "anchored")


def perturbed_tokens(cell: np.ndarray, genes: Sequence[int], kind: str, input_size: int, framed: bool,
                     rule: str = "set") -> np.ndarray | None:
    """One cell's tokens with ``genes`` (token ids) deleted or overexpressed under ``rule`` (see the module
    docstring); None where the rule measures nothing in this cell."""
    cell = np.asarray(cell, dtype=np.int64)
    genes = np.asarray(genes, dtype=np.int64)
    hit = np.isin(cell, genes)
    needs_all = rule == "anchored" or (rule == "combo" and kind == "delete")
    if not hit.any() or (needs_all and not np.isin(genes, cell).all()):
        return None if kind == "delete" or needs_all else _moved(cell, genes, hit, input_size, framed)
    if kind == "delete":
        return cell[~hit]
    return _moved(cell, cell[hit] if rule == "anchored" else genes, hit, input_size, framed)


def _moved(cell: np.ndarray, front: np.ndarray, hit: np.ndarray, input_size: int, framed: bool) -> np.ndarray:
    rest = cell[~hit]
    head = 1 if framed else 0
    moved = np.concatenate([rest[:head], front, rest[head:]])
    if len(moved) > input_size:
        moved = np.concatenate([moved[: input_size - 1], moved[-1:]]) if framed else moved[:input_size]
    return moved


def single_gene_variants(cell: np.ndarray, positions: np.ndarray, kind: str, head: int) -> np.ndarray:
    """The variants of a cell for genes it has at token ``positions``, one row each, by one gather (what
    :func:`perturbed_tokens` gives gene by gene)."""
    length = len(cell)
    if kind == "delete":
        j = np.arange(length - 1)
        return cell[j[None, :] + (j[None, :] >= positions[:, None])]
    j = np.arange(length)
    shifted = j - (j > head)  # the index in the cell without the moved gene
    index = shifted[None, :] + (shifted[None, :] >= positions[:, None])
    index[:, j < head] = j[j < head]
    index[:, head] = positions
    return cell[index]


def inserted_variants(cell: np.ndarray, tokens: np.ndarray, head: int, input_size: int, framed: bool) -> np.ndarray:
    """The variants of a cell with each of ``tokens`` (genes it lacks) inserted at the front, truncated."""
    base = np.concatenate([cell[:head], [0], cell[head:]])
    if len(base) > input_size:
        base = np.concatenate([base[: input_size - 1], base[-1:]]) if framed else base[:input_size]
    variants = np.repeat(base[None, :], len(tokens), axis=0)
    variants[:, head] = tokens
    return variants


def combinations(tokens: Sequence[int], size: int) -> list[tuple[int, ...]]:
    """Every ``size`` genes of a list, each group in the list's order (upstream's ``itertools.combinations``):
    n choose ``size`` groups."""
    return list(itertools.combinations([int(token) for token in tokens], size))


def anchored_pairs(anchor: int, tokens: Sequence[int]) -> list[tuple[int, int]]:
    """The anchor with each other gene of ``tokens`` (the anchor itself left out)."""
    return [(int(anchor), int(token)) for token in tokens if int(token) != int(anchor)]
