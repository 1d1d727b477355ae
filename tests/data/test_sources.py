"""Data sources: the canonical .h5ad is cached, reused, rebuilt when an input changes, built once."""

from __future__ import annotations

import os
import shutil

import anndata as ad
import numpy as np
import pytest

from geneformer_colon.common.errors import InputError
from geneformer_colon.data import kul3
from geneformer_colon.data.sources import H5adSource, KUL3Source, SyntheticKUL3Source
from geneformer_colon.data.synthetic import GENE_TABLE_FILE, GENERATOR_VERSION


@pytest.fixture
def synthetic(tmp_path) -> SyntheticKUL3Source:
    return SyntheticKUL3Source(data_dir=str(tmp_path / "geo"), n_cells=120, n_genes=150, seed=3)


def counting_reads(monkeypatch) -> list:
    parses = []
    real_read = kul3.read_kul3
    monkeypatch.setattr(kul3, "read_kul3", lambda *a, **k: parses.append(a) or real_read(*a, **k))
    return parses


def test_geo_files_cache_reused_then_rebuilt_when_an_input_changes(synthetic, tmp_path, monkeypatch):
    synthetic.check_inputs()  # writes the GEO files
    geo = KUL3Source(data_dir=synthetic.data_dir, gene_map=synthetic.gene_map)
    cache = tmp_path / "cache"
    first = geo.canonical(cache)
    built_ns = first.stat().st_mtime_ns
    parses = counting_reads(monkeypatch)
    assert geo.canonical(cache) == first and parses == [] and first.stat().st_mtime_ns == built_ns

    # a gene table with one gene fewer (new bytes, new mtime): a new canonical file
    table = tmp_path / "geo" / f"v{GENERATOR_VERSION}-cells120-genes150-seed3" / GENE_TABLE_FILE
    lines = table.read_text().splitlines(keepends=True)
    table.write_text("".join(lines[:1] + lines[2:]))
    rebuilt = geo.canonical(cache)
    assert len(parses) == 1 and rebuilt != first
    unmapped = [(ad.read_h5ad(path).var["ensembl_id"] == "").sum() for path in (first, rebuilt)]
    assert unmapped[1] == unmapped[0] + 1

    # a file a user hands in that is touched (same bytes, new mtime) counts as changed
    stat = table.stat()
    os.utime(table, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    geo.canonical(cache)
    assert len(parses) == 2


def test_synthetic_data_is_keyed_by_its_settings_not_its_files_times(synthetic, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = synthetic.canonical(cache)
    parses = counting_reads(monkeypatch)
    shutil.rmtree(synthetic.data_dir)  # regenerated with new times: the same cohort
    assert synthetic.canonical(cache) == first and parses == []
    other = SyntheticKUL3Source(data_dir=str(tmp_path / "geo"), n_cells=120, n_genes=150, seed=4)
    assert other.canonical(cache) != first and len(parses) == 1


def test_a_killed_build_leaves_nothing_that_stops_the_next(synthetic, tmp_path):
    cache = tmp_path / "cache"
    path = synthetic.canonical(cache)
    path.unlink()
    leftover = path.with_name(f".{path.name}.tmp-deadbeef")
    leftover.write_bytes(b"half a file")
    assert synthetic.canonical(cache) == path and path.is_file()
    assert not leftover.exists()
    assert ad.read_h5ad(path).n_obs == 120


def test_h5ad_source_keys_are_part_of_the_cache_key(synthetic, tmp_path):
    adata = ad.read_h5ad(synthetic.canonical(tmp_path / "cache"))
    adata.obs = adata.obs.rename(columns={"donor": "patient"})
    path = tmp_path / "mine.h5ad"
    adata.write_h5ad(path)
    by_patient = H5adSource(path=str(path), donor_key="patient").cells(tmp_path / "cache")
    by_sample = H5adSource(path=str(path), donor_key="sample").cells(tmp_path / "cache")
    assert by_patient.identity != by_sample.identity
    np.testing.assert_array_equal(by_patient.obs["donor"], adata.obs["patient"])
    assert H5adSource(path=str(path)).describe() == str(path)


def test_missing_geo_files_say_where_to_get_them(tmp_path):
    with pytest.raises(InputError, match=r"GSE144735.*data.source.data_dir"):
        KUL3Source(data_dir=str(tmp_path / "nothing")).canonical(tmp_path / "cache")


def test_a_missing_geneformer_clone_names_the_repository_not_the_geo_files(tmp_path):
    """GEO files in place, no Geneformer clone: one line naming the missing file, the repository and the clone
    command (the data source's gene map, the model's dictionaries and its checkpoint alike)."""
    from geneformer_colon.data.dictionaries import load_pickle_dict
    from geneformer_colon.model.backbone import Vocabulary, pretrained_bert

    geo = tmp_path / "kul3"
    geo.mkdir()
    for name in (kul3.MATRIX_FILE, kul3.ANNOTATION_FILE):
        (geo / name).write_bytes(b"")
    clone = tmp_path / "Geneformer"
    gene_map = clone / "geneformer" / "gene_dictionaries_30m" / "gene_name_id_dict_gc30M.pkl"
    errors = []
    for attempt in (lambda: KUL3Source(data_dir=str(geo), gene_map=str(gene_map)).canonical(tmp_path / "cache"),
                    lambda: load_pickle_dict(gene_map),
                    lambda: pretrained_bert(Vocabulary(10, 0, 16), clone, subfolder="Geneformer-V1-10M")):
        with pytest.raises(InputError) as error:
            attempt()
        errors.append(str(error.value))
    for message in errors:
        assert "\n" not in message and "GEO" not in message and "GSE144735" not in message
        assert "https://huggingface.co/ctheodoris/Geneformer" in message
        assert f"git clone https://huggingface.co/ctheodoris/Geneformer {clone}" in message
    assert errors[0].startswith(f"{gene_map}: input file not found")
