"""Data sources: the canonical .h5ad is cached, reused, and rebuilt when an input changes."""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pytest

from geneformer_colon.data import ingest
from geneformer_colon.data.sources import H5adSource, KUL3Source, SyntheticKUL3Source
from geneformer_colon.data.synthetic import GENE_TABLE_FILE
from geneformer_colon.errors import InputError


@pytest.fixture
def synthetic(tmp_path) -> SyntheticKUL3Source:
    return SyntheticKUL3Source(data_dir=str(tmp_path / "geo"), n_cells=120, n_genes=150, seed=3)


def test_cache_reused_then_rebuilt_when_an_input_changes(synthetic, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = synthetic.h5ad(cache)
    built_ns = first.stat().st_mtime_ns
    parses = []
    real_read = ingest.read_kul3
    monkeypatch.setattr(ingest, "read_kul3", lambda *a, **k: parses.append(a) or real_read(*a, **k))

    assert synthetic.h5ad(cache) == first and parses == [] and first.stat().st_mtime_ns == built_ns

    # a gene table with one gene fewer (new bytes, new mtime): a new canonical file
    table = tmp_path / "geo" / "cells120-genes150-seed3" / GENE_TABLE_FILE
    lines = table.read_text().splitlines(keepends=True)
    table.write_text("".join(lines[:1] + lines[2:]))
    rebuilt = synthetic.h5ad(cache)
    assert len(parses) == 1 and rebuilt != first
    assert (ad.read_h5ad(rebuilt).var["ensembl_id"] == "").sum() == (ad.read_h5ad(first).var["ensembl_id"] == "").sum() + 1

    # touching an input (same bytes, new mtime) also rebuilds
    stat = table.stat()
    os.utime(table, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    synthetic.h5ad(cache)
    assert len(parses) == 2


def test_h5ad_source_keys_are_part_of_the_cache_key(synthetic, tmp_path):
    canonical = synthetic.h5ad(tmp_path / "cache")
    adata = ad.read_h5ad(canonical)
    adata.obs = adata.obs.rename(columns={"donor": "patient"})
    path = tmp_path / "mine.h5ad"
    adata.write_h5ad(path)
    by_patient = H5adSource(path=str(path), donor_key="patient").h5ad(tmp_path / "cache")
    by_sample = H5adSource(path=str(path), donor_key="sample").h5ad(tmp_path / "cache")
    assert by_patient != by_sample
    np.testing.assert_array_equal(ad.read_h5ad(by_patient).obs["donor"], adata.obs["patient"])


def test_missing_geo_files_say_where_to_get_them(tmp_path):
    with pytest.raises(InputError, match=r"GSE144735.*data.source.data_dir"):
        KUL3Source(data_dir=str(tmp_path / "nothing")).h5ad(tmp_path / "cache")
