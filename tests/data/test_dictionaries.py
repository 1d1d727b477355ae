"""Gene dictionaries: safe loading, deriving them from data, saving, fingerprints; gene-name maps."""

from __future__ import annotations

import os
import pickle
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from geneformer_colon.common.errors import InputError
from geneformer_colon.data.counts import CellCounts
from geneformer_colon.data.dictionaries import (
    GeneDictionaries,
    derive_dictionaries,
    load_pickle_dict,
    read_gene_name_map,
    special_token_ids,
)


class _RunsACommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({"ENSG00000000003": _RunsACommand(f"touch {marker}")}))
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: not a Geneformer dictionary pickle.*system"):
        load_pickle_dict(path)
    assert not marker.exists()


class _AllowedConstructorWrongArguments:
    def __reduce__(self):
        return (dict, (5,))  # builtins.dict is allowed; dict(5) fails while unpickling


def test_an_allowed_constructor_with_wrong_arguments_is_one_line(tmp_path):
    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps(_AllowedConstructorWrongArguments()))
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: not a Geneformer dictionary pickle"):
        load_pickle_dict(path)


def test_lfs_pointer_is_named(tmp_path):
    path = tmp_path / "gene_median_dictionary_gc30M.pkl"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123abcd\nsize 940965\n")
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: is a Git LFS pointer.*git lfs pull"):
        GeneDictionaries.load({"<pad>": 0, "<mask>": 1}, path)


def test_real_dictionaries_load_as_plain_types(geneformer_dicts):
    v2 = GeneDictionaries.load(
        geneformer_dicts / "token_dictionary_gc104M.pkl",
        geneformer_dicts / "gene_median_dictionary_gc104M.pkl",
        geneformer_dicts / "ensembl_mapping_dict_gc104M.pkl",
    )
    assert len(v2.token) == 20_275 and len(v2.median) == 42_005 and len(v2.mapping) == 173_697
    assert {type(value) for value in v2.token.values()} == {int}
    assert {type(value) for value in v2.median.values()} == {float}
    assert special_token_ids(v2.token, "V2") == {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}


def test_load_refuses_wrong_contents(tmp_path):
    path = tmp_path / "gene_median_dictionary.pkl"
    path.write_bytes(pickle.dumps({"ENSG1": 1.5, "ENSG2": 0.0}))
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: entry 'ENSG2' is 0.0, expected a positive"):
        GeneDictionaries.load({"ENSG1": 2}, path)
    with pytest.raises(InputError, match=r"^token dictionary: entry 'ENSG1' is 'ENSG7', expected a non-negative"):
        GeneDictionaries.load({"ENSG1": "ENSG7"}, {"ENSG1": 1.0})


def counts_adata(seed: int, with_n_counts: bool) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = rng.negative_binomial(1, 0.6, size=(40, 8)) * (rng.random((40, 8)) < 0.6)
    X[:, 3] = 0  # a gene no cell expresses
    X[5] = 0  # a cell without counts
    ids = ["E1", "E2", "E3", "E4", "E2", "", "E5", "E6"]  # E2 has two columns; one column has no id
    var = pd.DataFrame({"ensembl_id": ids}, index=list("abcdefgh"))
    adata = ad.AnnData(sp.csr_matrix(X.astype(np.int32)), var=var)
    if with_n_counts:  # counted before some genes were filtered out: larger than the row sums
        adata.obs["n_counts"] = X.sum(axis=1) + rng.integers(0, 50, 40)
    return adata


def reference_medians(adata: ad.AnnData) -> dict[str, float]:
    """Per gene: median over the cells expressing it of count / n_counts * 10,000."""
    X = adata.X.toarray()
    n_counts = adata.obs["n_counts"].to_numpy() if "n_counts" in adata.obs else X.sum(axis=1)
    ids = list(adata.var["ensembl_id"])
    medians = {}
    for gene in dict.fromkeys(ids):
        if gene:
            counts = X[:, [i for i, gene_id in enumerate(ids) if gene_id == gene]].sum(axis=1)
            expressed = counts > 0
            if expressed.any():
                medians[gene] = float(np.median(counts[expressed] / n_counts[expressed] * 10_000))
    return medians


@pytest.mark.parametrize("with_n_counts", [False, True])
def test_derived_medians_match_a_per_gene_reference(with_n_counts):
    adata = counts_adata(seed=1, with_n_counts=with_n_counts)
    derived = derive_dictionaries(CellCounts.from_anndata(adata))
    assert derived.median == reference_medians(adata)
    assert derived.mapping is None


def test_derived_vocabulary_is_specials_then_expressed_genes_in_column_order():
    adata = counts_adata(seed=2, with_n_counts=False)
    expected = ["<pad>", "<mask>", "E1", "E2", "E3", "E5", "E6"]  # E4 and "" left out
    derived = derive_dictionaries(CellCounts.from_anndata(adata), "V1").token
    assert derived == {gene: i for i, gene in enumerate(expected)}
    assert list(derive_dictionaries(CellCounts.from_anndata(adata), "V1").token) == expected
    v2 = derive_dictionaries(CellCounts.from_anndata(adata), "V2").token
    assert list(v2)[:4] == ["<pad>", "<mask>", "<cls>", "<eos>"] and v2["E1"] == 4
    with pytest.raises(InputError, match="model_version 'v1' is unknown"):
        derive_dictionaries(CellCounts.from_anndata(adata), "v1")


def test_save_load_round_trip(tmp_path):
    dicts = GeneDictionaries(
        {"<pad>": 0, "<mask>": 1, "ENSG1": 2}, {"ENSG1": 0.1 + 0.2}, {"ENSG1": "ENSG1", "ABC": "ENSG1"}
    )
    directory = tmp_path / "not" / "yet" / "there"
    dicts.save(directory)
    names = ["ensembl_mapping_dict.pkl", "gene_median_dictionary.pkl", "token_dictionary.pkl"]
    assert sorted(path.name for path in directory.iterdir()) == names
    assert load_pickle_dict(directory / "gene_median_dictionary.pkl") == {"ENSG1": 0.1 + 0.2}
    loaded = GeneDictionaries.load(directory / names[2], directory / names[1], directory / names[0])
    assert loaded == dicts
    assert loaded.fingerprint() == dicts.fingerprint()
    without_mapping = tmp_path / "plain"
    GeneDictionaries(dicts.token, dicts.median).save(without_mapping)
    assert not (without_mapping / "ensembl_mapping_dict.pkl").exists()


def test_fingerprint_follows_contents_not_order():
    token = {"<pad>": 0, "<mask>": 1, "ENSG1": 2, "ENSG2": 3}
    median = {"ENSG1": 1.5, "ENSG2": 2.5}
    base = GeneDictionaries(token, median).fingerprint()
    assert GeneDictionaries(dict(reversed(token.items())), dict(reversed(median.items()))).fingerprint() == base
    assert GeneDictionaries(token, {**median, "ENSG2": float(np.nextafter(2.5, 3))}).fingerprint() != base
    assert GeneDictionaries({**token, "ENSG2": 4}, median).fingerprint() != base
    assert GeneDictionaries(token, median, {"ENSG1": "ENSG1"}).fingerprint() != base
    assert len(base) == 64 and base == GeneDictionaries(dict(token), dict(median)).fingerprint()


def test_gene_map_tsv_with_or_without_header(tmp_path) -> None:
    rows = "TP53\tENSG00000141510\nEGFR\tENSG00000146648\nNOID\t\n"
    with_header = tmp_path / "with.tsv"
    with_header.write_text("symbol\tensembl_id\n" + rows)
    without = tmp_path / "without.tsv"
    without.write_text(rows)
    expected = {"TP53": "ENSG00000141510", "EGFR": "ENSG00000146648"}
    assert read_gene_name_map(with_header) == expected
    assert read_gene_name_map(without) == expected
    bad = tmp_path / "bad.tsv"
    bad.write_text("TP53\tENSG00000141510\tchr17\n")
    with pytest.raises(InputError, match=r"bad\.tsv: line 1 has 3 tab-separated fields"):
        read_gene_name_map(bad)
    token_dict = tmp_path / "token_dictionary.pkl"
    token_dict.write_bytes(pickle.dumps({"ENSG00000141510": 7}))
    with pytest.raises(InputError, match="token_dictionary.pkl: maps 'ENSG00000141510' to int"):
        read_gene_name_map(token_dict)


def test_real_geneformer_gene_name_map(geneformer_dicts) -> None:
    mapping = read_gene_name_map(geneformer_dicts / "gene_name_id_dict_gc30M.pkl")
    assert mapping["TP53"] == "ENSG00000141510"
    assert len(mapping) == 40_248
