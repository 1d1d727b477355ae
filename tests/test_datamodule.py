"""Token store caching, donor splits and batches of the datamodule on synthetic GEO data."""

from __future__ import annotations

import pickle

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import compose_train, tiny_overrides
from hydra.utils import instantiate

from geneformer_colon.common.errors import InputError
from geneformer_colon.runs.config import plain


def datamodule(tmp_path, shared, *overrides):
    cfg = compose_train(tiny_overrides(tmp_path / "outputs", shared) + list(overrides))
    return instantiate(cfg.data, tokenizer=plain(cfg.model.tokenizer))


def test_splits_are_by_donor_and_never_share_one(tmp_path, shared_dirs):
    dm = datamodule(tmp_path, shared_dirs)
    dm.setup()
    donors = {split: set(dm.split_cells(split)["donor"]) for split in ("train", "val", "test")}
    assert donors["val"] == {"KUL19"} and donors["test"] == {"KUL01"}
    assert donors["train"] == {"KUL21", "KUL28", "KUL30", "KUL31"}
    assert sum(len(dm.splits[s]) for s in dm.splits) == len(dm.store)


def test_unknown_donor_lists_the_donors_present(tmp_path, shared_dirs):
    dm = datamodule(tmp_path, shared_dirs, "data.test_donors=[KUL99]")
    with pytest.raises(InputError, match=r"data.test_donors.*KUL99.*KUL01.*KUL19"):
        dm.setup()


def test_donor_in_two_splits_is_refused(tmp_path, shared_dirs):
    dm = datamodule(tmp_path, shared_dirs, "data.test_donors=[KUL19]")
    with pytest.raises(InputError, match="share"):
        dm.setup()


def test_cell_type_filter_and_unknown_cell_type(tmp_path, shared_dirs):
    dm = datamodule(tmp_path, shared_dirs, "data.cell_types=[Epithelial cells]")
    dm.setup()
    assert set(dm.split_cells("train")["cell_type"]) == {"Epithelial cells"}
    bad = datamodule(tmp_path, shared_dirs, "data.cell_types=[Neurons]")
    with pytest.raises(InputError, match=r"Neurons.*Epithelial cells"):
        bad.setup()


def test_a_class_absent_from_a_split_is_an_error(tmp_path, shared_dirs):
    dm = datamodule(tmp_path, shared_dirs, "data.labels=[Normal, Border, Tumor, Metastasis]")
    with pytest.raises(InputError, match="Metastasis"):
        dm.setup()


def test_batches_pad_to_their_longest_cell(tmp_path, shared_dirs):
    dm = datamodule(tmp_path, shared_dirs)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == lengths.max()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    for row, index in enumerate(batch["index"].tolist()):
        np.testing.assert_array_equal(batch["input_ids"][row, : lengths[row]].numpy(), dm.store.cell_tokens(index))
    assert set(batch["labels"].tolist()) <= {0, 1, 2}


def test_store_is_reused_and_rebuilt_when_the_dictionary_changes(tmp_path, shared_dirs):
    first = datamodule(tmp_path, shared_dirs)
    first.setup()
    again = datamodule(tmp_path, shared_dirs)
    again.setup()
    assert again.store.directory == first.store.directory
    assert (again.store.directory / "tokens.bin").stat().st_mtime_ns == (
        first.store.directory / "tokens.bin").stat().st_mtime_ns

    # the same vocabulary with one gene's median changed: a new store
    token = dict(first.dictionaries.token)
    median = dict(first.dictionaries.median)
    gene = next(iter(median))
    median[gene] *= 1000.0
    for name, content in (("token.pkl", token), ("median.pkl", median)):
        (tmp_path / name).write_bytes(pickle.dumps(content))
    changed = datamodule(tmp_path, shared_dirs, f"model.tokenizer.token_dictionary={tmp_path / 'token.pkl'}",
                         f"model.tokenizer.gene_median_dictionary={tmp_path / 'median.pkl'}")
    changed.setup()
    assert changed.store.directory != first.store.directory
    assert len(changed.store) == len(first.store)


def test_a_store_built_in_chunks_is_byte_identical_to_one_built_at_once(tmp_path, shared_dirs):
    from geneformer_colon.data.store import build_store

    dm = datamodule(tmp_path, shared_dirs)
    dm.prepare_data()
    for chunk_cells in (7, 100, 1_000_000):
        build_store(dm.cells, dm.dictionaries, dm.settings, tmp_path / f"store{chunk_cells}", chunk_cells)
    names = sorted(path.name for path in (tmp_path / "store7").iterdir())
    assert names == ["cells.csv", "meta.json", "offsets.npy", "tokens.bin"]
    for chunk_cells in (100, 1_000_000):
        for name in names:
            assert (tmp_path / "store7" / name).read_bytes() == (tmp_path / f"store{chunk_cells}" / name).read_bytes()


def test_an_h5ad_is_read_in_place_and_tokenized_as_its_canonical_copy_was(tmp_path, shared_dirs):
    """data=h5ad: no copy of the file under the cache; the dictionaries, tokens and cells of a canonical file's."""
    geo = datamodule(tmp_path, shared_dirs)
    geo.prepare_data()
    adata = ad.read_h5ad(geo.cells.path)  # a canonical file, as a user's file with other names
    adata.obs = adata.obs.rename(columns={"donor": "patient"})
    adata.layers["counts"] = adata.X.astype(np.float32)
    adata.X = sp.csr_matrix(adata.shape, dtype=np.float32)
    path = tmp_path / "mine.h5ad"
    adata.write_h5ad(path)
    cache = tmp_path / "cache"
    cfg = compose_train([f"paths.output_dir={tmp_path / 'outputs'}", f"paths.cache_dir={cache}", "data=h5ad",
                         f"data.source.path={path}", "data.source.donor_key=patient", "data.source.sample_key=sample",
                         "data.source.layer=counts", "model.tokenizer.input_size=128"])
    mine = instantiate(cfg.data, tokenizer=plain(cfg.model.tokenizer))
    mine.prepare_data()
    assert not list(cache.rglob("*.h5ad")) and (cache / "tokens").is_dir()
    assert mine.dictionaries == geo.dictionaries
    for name in ("tokens.bin", "offsets.npy", "cells.csv"):
        assert (mine.store.directory / name).read_bytes() == (geo.store.directory / name).read_bytes()
