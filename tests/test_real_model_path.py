"""The real-data path, `data=kul3 model=geneformer_v1`, end to end on local files.

A Geneformer checkout is imitated in a temporary folder: the real V1 gene dictionaries (from
../shared/geneformer) where Geneformer keeps them, and a small `BertForMaskedLM` with the real
V1 vocabulary saved with `save_pretrained` as `Geneformer-V1-10M/`. The GEO files carry real
gene symbols, which ingest maps to Ensembl ids through the real `gene_name_id_dict`.
"""

from __future__ import annotations

import json

import pytest
from conftest import compose_train, tiny_overrides

from geneformer_colon.data.dictionaries import load_pickle_dict
from geneformer_colon.data.kul3 import write_geo_matrix
from geneformer_colon.data.synthetic import generate_counts, write_synthetic_kul3
from geneformer_colon.jobs.train import train


@pytest.fixture
def geneformer_checkout(tmp_path, geneformer_dicts):
    from transformers import BertConfig, BertForMaskedLM

    checkout = tmp_path / "Geneformer"
    dictionaries = checkout / "geneformer" / "gene_dictionaries_30m"
    dictionaries.mkdir(parents=True)
    for name in ("token_dictionary", "gene_median_dictionary", "ensembl_mapping_dict", "gene_name_id_dict"):
        (dictionaries / f"{name}_gc30M.pkl").symlink_to(geneformer_dicts / f"{name}_gc30M.pkl")
    vocab_size = len(load_pickle_dict(geneformer_dicts / "token_dictionary_gc30M.pkl"))
    BertForMaskedLM(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=2048, hidden_act="relu",
                               pad_token_id=0)).save_pretrained(checkout / "Geneformer-V1-10M")
    return checkout


def test_kul3_with_geneformer_v1_trains_on_real_dictionaries(tmp_path, shared_dirs, geneformer_checkout):
    geo = tmp_path / "kul3"
    write_synthetic_kul3(geo, n_cells=300, n_genes=300, seed=1)
    # the same cohort, its genes renamed to real symbols that the V1 vocabulary knows
    token = load_pickle_dict(geneformer_checkout / "geneformer/gene_dictionaries_30m/token_dictionary_gc30M.pkl")
    names = load_pickle_dict(geneformer_checkout / "geneformer/gene_dictionaries_30m/gene_name_id_dict_gc30M.pkl")
    symbols = sorted(symbol for symbol, gene in names.items() if gene in token)[:300]
    cohort = generate_counts(300, 300, seed=1)
    write_geo_matrix(geo / "GSE144735_processed_KUL3_CRC_10X_raw_UMI_count_matrix.txt.gz", cohort.counts, symbols,
                     list(cohort.annotation["Index"]))

    overrides = tiny_overrides(tmp_path / "outputs", shared_dirs)
    overrides = [o for o in overrides if not o.startswith(("data.source", "model."))]
    cfg = compose_train(overrides + ["experiment=colon6", "data=kul3", "model=geneformer_v1",
                                     f"paths.geneformer_dir={geneformer_checkout}", f"data.source.data_dir={geo}"])
    train(cfg)
    metrics = json.loads((tmp_path / "outputs" / "colon6" / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    config = (tmp_path / "outputs" / "colon6" / "config.yaml").read_text()
    assert "Geneformer-V1-10M" in config and "gene_dictionaries_30m/token_dictionary_gc30M.pkl" in config
    saved = load_pickle_dict(tmp_path / "outputs" / "colon6" / "dictionaries" / "token_dictionary.pkl")
    assert len(saved) == len(token)
