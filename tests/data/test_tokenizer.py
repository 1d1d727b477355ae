"""The rank-value tokenizer against a plain per-cell implementation of Geneformer's definition."""

from __future__ import annotations

import collections
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from geneformer_colon.common.errors import InputError
from geneformer_colon.data.counts import CellCounts
from geneformer_colon.data.dictionaries import GeneDictionaries, derive_dictionaries
from geneformer_colon.data.tokenizer import (
    TokenizerSettings,
    tokenize_anndata,
    tokenize_cells,
)

V1_FILES = ("token_dictionary_gc30M.pkl", "gene_median_dictionary_gc30M.pkl")
V2_FILES = ("token_dictionary_gc104M.pkl", "gene_median_dictionary_gc104M.pkl", "ensembl_mapping_dict_gc104M.pkl")


@pytest.fixture(scope="module")
def v1(geneformer_dicts) -> GeneDictionaries:
    return GeneDictionaries.load(*(geneformer_dicts / name for name in V1_FILES))


@pytest.fixture(scope="module")
def v2(geneformer_dicts) -> GeneDictionaries:
    return GeneDictionaries.load(*(geneformer_dicts / name for name in V2_FILES))


def reference_tokens(adata: ad.AnnData, dicts: GeneDictionaries, version: str, input_size: int | None = None):
    """Geneformer's rank-value encoding one cell at a time, straight from its definition."""
    ids = list(adata.var["ensembl_id"])
    if dicts.mapping is not None:
        ids = [dicts.mapping.get(gene_id.upper()) for gene_id in ids]
    first_column: dict[str, int] = {}
    for column, gene in enumerate(ids):
        if gene in dicts.token and gene in dicts.median:
            first_column.setdefault(gene, column)
    size = input_size or {"V1": 2048, "V2": 4096}[version]
    frame = ["<cls>", "<eos>"] if version == "V2" else []
    counts_matrix = adata.X.toarray()
    cells = []
    for row, counts_row in enumerate(counts_matrix):
        total = adata.obs["n_counts"].iloc[row] if "n_counts" in adata.obs else int(counts_row.sum())
        counts: dict[str, int] = {}
        for column in np.flatnonzero(counts_row):
            gene = ids[column]
            if gene in first_column:
                counts[gene] = counts.get(gene, 0) + int(counts_row[column])
        ranked = sorted(
            counts, key=lambda gene: (-(counts[gene] / total * 10_000 / dicts.median[gene]), first_column[gene])
        )
        tokens = [dicts.token[gene] for gene in ranked[: size - len(frame)]]
        if tokens and frame:
            tokens = [dicts.token[frame[0]], *tokens, dicts.token[frame[1]]]
        cells.append(tokens)
    return cells


def tied_genes(dicts: GeneDictionaries) -> list[list[str]]:
    """Groups of vocabulary genes sharing one median: equal counts give exactly equal values."""
    by_median = collections.defaultdict(list)
    for gene, median in dicts.median.items():
        if gene in dicts.token:
            by_median[median].append(gene)
    return [genes for genes in by_median.values() if len(genes) > 1]


def make_adata(ids: list[str], ties: list[list[str]], seed: int) -> ad.AnnData:
    """Cells long (all genes) and short, empty, and vocabulary-less; tied genes with equal counts."""
    rng = np.random.default_rng(seed)
    n_genes = len(ids)
    column = {gene_id: i for i, gene_id in enumerate(ids)}
    absent = [i for i, gene_id in enumerate(ids) if gene_id.startswith("ABSENT")]
    X = np.zeros((9, n_genes), dtype=np.int32)
    X[0] = rng.integers(1, 6, n_genes)  # every gene: longer than the input size
    X[1, rng.choice(n_genes, 40, replace=False)] = rng.integers(1, 4, 40)  # short
    X[3, absent] = 7  # only genes outside the vocabulary: empty after filtering
    for row, density in zip(range(4, 9), (0.2, 0.5, 0.9, 0.97, 0.99)):
        mask = rng.random(n_genes) < density
        X[row, mask] = rng.negative_binomial(1, 0.3, int(mask.sum())) + 1
    for row in (0, 1, 4, 5, 6):  # ties near the top of the ranking, where they are kept
        for group in ties:
            X[row, [column[gene] for gene in group]] = 60 + row
    var = pd.DataFrame({"ensembl_id": ids}, index=[f"g{i}" for i in range(n_genes)])
    return ad.AnnData(sp.csr_matrix(X), var=var)


def v1_ids(dicts: GeneDictionaries, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    rng = np.random.default_rng(seed)
    ties = tied_genes(dicts)
    tied = sorted({gene for group in ties for gene in group})
    genes = sorted(set(dicts.token) & set(dicts.median) - set(tied))
    ids = [*rng.choice(genes, 2300, replace=False), *tied, *(f"ABSENT{i}" for i in range(25))]
    rng.shuffle(ids)
    return ids, ties


def test_v1_matches_reference(v1):
    ids, ties = v1_ids(v1)
    column = {gene_id: i for i, gene_id in enumerate(ids)}
    # the premise: some tied pair's column order is not its token order, so the tie rule shows
    assert any((column[a] < column[b]) != (v1.token[a] < v1.token[b]) for a, b, *_ in ties)
    adata = make_adata(ids, ties, seed=1)
    cells = tokenize_anndata(adata, v1.token, v1.median, model_version="V1")
    expected = reference_tokens(adata, v1, "V1")
    assert [list(cell) for cell in cells] == expected
    assert len(cells[0]) == 2048 and 0 < len(cells[1]) < 2048
    assert len(cells[2]) == 0 and len(cells[3]) == 0
    assert not any({0, 1} & set(cell.tolist()) for cell in cells)  # no special token in V1


def test_v1_input_size_override(v1, geneformer_dicts):
    ids, ties = v1_ids(v1, seed=2)
    adata = make_adata(ids, ties, seed=3)
    paths = [geneformer_dicts / name for name in V1_FILES]
    cells = tokenize_anndata(adata, *paths, input_size=100)
    assert [list(cell) for cell in cells] == reference_tokens(adata, v1, "V1", input_size=100)
    assert max(len(cell) for cell in cells) == 100


def v2_ids(dicts: GeneDictionaries, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """Real V2 ids, tied groups, several ids that collapse onto one gene (case-insensitively)."""
    rng = np.random.default_rng(seed)
    sources = collections.defaultdict(list)
    for source, target in dicts.mapping.items():
        if source != target and source.startswith("ENSG") and target in dicts.token:
            sources[target].append(source)
    collapsing = [target for target, ids in sources.items() if len(ids) >= 2][:6]
    collapsed = [source for target in collapsing for source in sources[target][:3]] + collapsing[:3]
    collapsed += [collapsed[0].lower(), collapsed[1].lower()]  # upper-cased before mapping
    ties = tied_genes(dicts)
    tied = sorted({gene for group in ties for gene in group})
    genes = sorted(set(dicts.token) & set(dicts.median) - set(tied) - set(collapsing))
    ids = [*rng.choice(genes, 4300, replace=False), *tied, *collapsed, *(f"ABSENT{i}" for i in range(25))]
    rng.shuffle(ids)
    return ids, ties


def test_v2_matches_reference_with_collapsing_ids(v2):
    ids, ties = v2_ids(v2)
    adata = make_adata(ids, ties, seed=4)
    cells = tokenize_anndata(adata, v2.token, v2.median, v2.mapping, model_version="V2")
    expected = reference_tokens(adata, v2, "V2")
    assert [list(cell) for cell in cells] == expected
    long = cells[0]
    assert len(long) == 4096 and long[0] == v2.token["<cls>"] and long[-1] == v2.token["<eos>"]
    assert len(cells[2]) == 0 and len(cells[3]) == 0  # empty cells get no <cls>/<eos> either
    # the premise: some cells hold several columns of one gene, whose counts were summed
    mapped = [v2.mapping.get(gene_id.upper()) for gene_id in ids]
    repeated = {gene for gene, n in collections.Counter(mapped).items() if gene in v2.token and n > 1}
    assert len(repeated) >= 6


def test_v2_input_size_override(v2):
    ids, ties = v2_ids(v2, seed=5)
    adata = make_adata(ids, ties, seed=6)
    cells = tokenize_anndata(adata, v2.token, v2.median, v2.mapping, model_version="V2", input_size=64)
    assert [list(cell) for cell in cells] == reference_tokens(adata, v2, "V2", input_size=64)
    assert max(len(cell) for cell in cells) == 64


def test_long_tie_runs_and_unsorted_duplicate_entries():
    """Hundreds of exactly equal values, and a CSR whose rows are out of order with duplicates."""
    n_genes = 300
    ids = [f"G{i}" for i in range(n_genes)]
    dicts = GeneDictionaries(
        token={"<pad>": 0, "<mask>": 1, **{gene_id: i + 2 for i, gene_id in enumerate(reversed(ids))}},
        median={gene_id: 1.0 if i % 3 else 0.5 for i, gene_id in enumerate(ids)},
    )
    rng = np.random.default_rng(7)
    rows, columns, counts = [], [], []
    for row in range(6):
        chosen = rng.permutation(n_genes)[: 250 + row]  # out of column order
        columns += [*chosen, *chosen[:20]]  # 20 duplicate entries: their counts add up
        counts += [*rng.integers(1, 3, chosen.size), *[1] * 20]
        rows += [row] * (chosen.size + 20)
    raw = sp.csr_matrix(
        (np.array(counts, dtype=np.int32), np.array(columns, dtype=np.int32), np.searchsorted(rows, np.arange(7))),
        shape=(6, n_genes),
    )
    assert not raw.has_canonical_format
    var = pd.DataFrame({"ensembl_id": ids}, index=ids)
    cells = tokenize_anndata(ad.AnnData(raw, var=var), dicts.token, dicts.median, input_size=200)
    canonical = ad.AnnData(sp.csr_matrix(raw.toarray()), var=var)  # toarray sums the duplicates
    assert [list(cell) for cell in cells] == reference_tokens(canonical, dicts, "V1", input_size=200)


def test_n_counts_from_obs_or_row_sums():
    """n_counts changes only rounding, so pick totals where two genes tie for one and not the other."""
    a, b = 1.0, 3.0  # medians; counts 1 and 3 give values (1/n*1e4)/1 and (3/n*1e4)/3
    strictly = [n for n in range(10, 200) if 3 / n * 10_000 / b < 1 / n * 10_000 / a]
    tied = [n for n in range(10, 200) if 3 / n * 10_000 / b == 1 / n * 10_000 / a]
    row_sum, obs_total = strictly[0], tied[0]
    ids = ["B", "A", "OTHER"]  # B (count 3) first: it wins a tie, loses otherwise
    X = sp.csr_matrix(np.array([[3, 1, row_sum - 4]], dtype=np.int32))
    dicts = {"token": {"<pad>": 0, "<mask>": 1, "A": 2, "B": 3}, "median": {"A": a, "B": b}}
    var = pd.DataFrame({"ensembl_id": ids}, index=ids)
    from_rows = ad.AnnData(X, var=var)
    from_obs = ad.AnnData(X, var=var, obs=pd.DataFrame({"n_counts": [obs_total]}, index=["c0"]))
    assert [list(c) for c in tokenize_anndata(from_rows, dicts["token"], dicts["median"])] == [[2, 3]]
    assert [list(c) for c in tokenize_anndata(from_obs, dicts["token"], dicts["median"])] == [[3, 2]]


def test_tokenize_cells_layout_and_empty_warning(v1, caplog):
    ids, ties = v1_ids(v1, seed=8)
    adata = make_adata(ids, ties, seed=9)
    cells = tokenize_cells(CellCounts.from_anndata(adata, "data/x.h5ad"), v1, TokenizerSettings("V1", input_size=512))
    assert cells.tokens.dtype == np.uint16 and cells.offsets.dtype == np.int64
    assert cells.offsets[0] == 0 and cells.offsets[-1] == cells.tokens.size and len(cells) == adata.n_obs
    assert cells.n_empty == 2 and list(cells.lengths[[2, 3]]) == [0, 0]
    with caplog.at_level(logging.WARNING):
        tokenize_anndata(adata, v1.token, v1.median, input_size=512)
    assert "2 of 9 cells have no gene in the vocabulary" in caplog.text


def test_derived_v2_dictionaries_frame_the_cell():
    X = sp.csr_matrix(np.array([[0, 2, 1], [0, 0, 0], [5, 0, 1]], dtype=np.int32))
    adata = ad.AnnData(X, var=pd.DataFrame({"ensembl_id": ["E1", "E2", "E3"]}, index=["a", "b", "c"]))
    dicts = derive_dictionaries(CellCounts.from_anndata(adata), model_version="V2")
    cells = tokenize_cells(CellCounts.from_anndata(adata), dicts, TokenizerSettings("V2"))
    assert [list(cell) for cell in cells.to_list()] == reference_tokens(adata, dicts, "V2")
    assert cells.to_list()[0][0] == dicts.token["<cls>"] == 2


def counts_adata(X) -> ad.AnnData:
    ids = ["ENSG00000000003", "ENSG00000000005", "ENSG00000000419"]
    return ad.AnnData(X, var=pd.DataFrame({"ensembl_id": ids}, index=["a", "b", "c"]))


def test_negative_counts_are_refused(v1):
    adata = counts_adata(sp.csr_matrix(np.array([[1, -2, 3]], dtype=np.int32)))
    with pytest.raises(InputError, match=r"^data/kul3.h5ad: X holds -2.*raw integer UMI counts"):
        tokenize_cells(CellCounts.from_anndata(adata, "data/kul3.h5ad"), v1, TokenizerSettings())


def test_fractional_counts_are_refused(v1):
    adata = counts_adata(sp.csr_matrix(np.array([[1.0, 0.5, 3.0]], dtype=np.float32)))
    with pytest.raises(InputError, match=r"^adata: X holds 0.5.*raw integer UMI counts"):
        tokenize_anndata(adata, v1.token, v1.median)


def test_no_vocabulary_gene_is_refused(v1):
    symbols = ["CD3E", "EPCAM", "LGR5"]
    adata = ad.AnnData(sp.csr_matrix(np.ones((2, 3), dtype=np.int32)), var=pd.DataFrame(index=symbols))
    with pytest.raises(InputError, match=r"none of the 3 gene ids in var_names \(e.g. 'CD3E'\).*gene_name_id_dict"):
        tokenize_anndata(adata, v1.token, v1.median)


def test_unknown_model_version_is_refused(v1):
    with pytest.raises(InputError, match="model_version 'V3' is unknown"):
        TokenizerSettings("V3")
    adata = counts_adata(sp.csr_matrix(np.ones((1, 3), dtype=np.int32)))
    with pytest.raises(InputError, match="model_version 'V3' is unknown"):
        tokenize_anndata(adata, v1.token, v1.median, model_version="V3")


def test_v2_needs_its_special_tokens(v1):
    adata = counts_adata(sp.csr_matrix(np.ones((1, 3), dtype=np.int32)))
    with pytest.raises(InputError, match=r"lacks \['<cls>', '<eos>'\].*V2"):
        tokenize_anndata(adata, v1.token, v1.median, model_version="V2")


@pytest.mark.slow
def test_float_counts_and_wide_token_ids():
    """Another compiled variant: float64 counts, int32 tokens (ids past 65,535)."""
    X = sp.csr_matrix(np.array([[2.0, 0.0, 5.0, 1.0], [0.0, 3.0, 3.0, 0.0]], dtype=np.float32))
    ids = ["A", "B", "C", "D"]
    adata = ad.AnnData(X, var=pd.DataFrame({"ensembl_id": ids}, index=ids))
    dicts = GeneDictionaries({"<pad>": 0, "<mask>": 1, "A": 70_000, "B": 3, "C": 4, "D": 5}, dict.fromkeys(ids, 1.0))
    cells = tokenize_cells(CellCounts.from_anndata(adata), dicts, TokenizerSettings())
    assert cells.tokens.dtype == np.int32
    assert [list(cell) for cell in cells.to_list()] == [[4, 70_000, 5], [3, 4]]
