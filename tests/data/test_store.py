"""The token store (store.py): built once per input and settings, rebuilt when the dictionaries change, and the same
bytes whatever the chunks it is built in."""

from __future__ import annotations

import pickle

from helpers.tiny import datamodule_of

from geneformer_colon.data.store import build_store


def test_store_is_reused_and_rebuilt_when_the_dictionary_changes(tiny_cfg, tmp_path):
    first = datamodule_of(tiny_cfg())
    first.setup()
    again = datamodule_of(tiny_cfg())
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
    changed = datamodule_of(tiny_cfg(f"model.tokenizer.token_dictionary={tmp_path / 'token.pkl'}",
                         f"model.tokenizer.gene_median_dictionary={tmp_path / 'median.pkl'}"))
    changed.setup()
    assert changed.store.directory != first.store.directory
    assert len(changed.store) == len(first.store)


def test_a_store_built_in_chunks_is_byte_identical_to_one_built_at_once(tiny_cfg, tmp_path):
    dm = datamodule_of(tiny_cfg())
    dm.prepare_data()
    for chunk_cells in (7, 100, 1_000_000):
        build_store(dm.cells, dm.dictionaries, dm.settings, tmp_path / f"store{chunk_cells}", chunk_cells)
    names = sorted(path.name for path in (tmp_path / "store7").iterdir())
    assert names == ["cells.csv", "meta.json", "offsets.npy", "tokens.bin"]
    for chunk_cells in (100, 1_000_000):
        for name in names:
            assert (tmp_path / "store7" / name).read_bytes() == (tmp_path / f"store{chunk_cells}" / name).read_bytes()
