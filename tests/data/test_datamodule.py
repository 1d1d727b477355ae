"""The datamodule on synthetic GEO data: donor splits, filters, batches, an h5ad read in place, one cache built once
by two runs started together (the token store itself: test_store.py)."""

from __future__ import annotations

import pickle

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from helpers.processes import run_script
from helpers.tiny import compose_train, datamodule_of, tiny_overrides
from hydra.utils import instantiate

from geneformer_colon.common.errors import InputError
from geneformer_colon.runs.config import plain


def test_splits_are_by_donor_and_never_share_one(tiny_cfg):
    dm = datamodule_of(tiny_cfg())
    dm.setup()
    donors = {split: set(dm.split_cells(split)["donor"]) for split in ("train", "val", "test")}
    assert donors["val"] == {"KUL19"} and donors["test"] == {"KUL01"}
    assert donors["train"] == {"KUL21", "KUL28", "KUL30", "KUL31"}
    assert sum(len(dm.splits[s]) for s in dm.splits) == len(dm.store)


def test_unknown_donor_lists_the_donors_present(tiny_cfg):
    dm = datamodule_of(tiny_cfg("data.test_donors=[KUL99]"))
    with pytest.raises(InputError, match=r"data.test_donors.*KUL99.*KUL01.*KUL19"):
        dm.setup()


def test_donor_in_two_splits_is_refused(tiny_cfg):
    dm = datamodule_of(tiny_cfg("data.test_donors=[KUL19]"))
    with pytest.raises(InputError, match="share"):
        dm.setup()


def test_cell_type_filter_and_unknown_cell_type(tiny_cfg):
    dm = datamodule_of(tiny_cfg("data.cell_types=[Epithelial cells]"))
    dm.setup()
    assert set(dm.split_cells("train")["cell_type"]) == {"Epithelial cells"}
    bad = datamodule_of(tiny_cfg("data.cell_types=[Neurons]"))
    with pytest.raises(InputError, match=r"Neurons.*Epithelial cells"):
        bad.setup()


def test_a_class_absent_from_a_split_is_an_error(tiny_cfg):
    dm = datamodule_of(tiny_cfg("data.labels=[Normal, Border, Tumor, Metastasis]"))
    with pytest.raises(InputError, match="Metastasis"):
        dm.setup()


def test_a_class_name_holding_the_conformal_separator_is_refused(tiny_cfg):
    dm = datamodule_of(tiny_cfg("data.labels=['Normal|Border', Tumor]"))
    with pytest.raises(InputError, match=r"the classes \['Normal\|Border'\] hold '\|', which joins"):
        dm.setup()


def test_batches_pad_to_their_longest_cell(tiny_cfg):
    dm = datamodule_of(tiny_cfg())
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == lengths.max()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    for row, index in enumerate(batch["index"].tolist()):
        np.testing.assert_array_equal(batch["input_ids"][row, : lengths[row]].numpy(), dm.store.cell_tokens(index))
    assert set(batch["labels"].tolist()) <= {0, 1, 2}


def test_an_h5ad_is_read_in_place_and_tokenized_as_its_canonical_copy_was(tiny_cfg, tmp_path):
    """data=h5ad: no copy of the file under the cache; the dictionaries, tokens and cells of a canonical file's."""
    geo = datamodule_of(tiny_cfg())
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


@pytest.mark.slow  # processes (six epochs / two at once): make test-slow, in CI
def test_two_runs_started_together_on_new_data_build_the_cache_once(tmp_path):
    shared = {"data": tmp_path / "data", "cache": tmp_path / "cache"}
    common = tiny_overrides(tmp_path / "outputs", shared) + ["data.source.seed=11", "debug=fdr"]
    logs = [open(tmp_path / f"{i}.log", "w") for i in range(2)]
    runs = [run_script("train.py", *common, f"run_name=together{i}", wait=False, stdout=logs[i], stderr=logs[i])
            for i in range(2)]
    for number, process in enumerate(runs):
        assert process.wait(timeout=300) == 0, (tmp_path / f"{number}.log").read_text()[-3000:]
    for name in ("ingest", "tokens", "dictionaries"):
        built = [path for path in (tmp_path / "cache" / name).iterdir() if not path.name.startswith(".")]
        assert len(built) == 1, (name, built)
    assert not list((tmp_path / "cache").rglob("*.tmp-*"))
    assert pickle.loads((tmp_path / "outputs/together0/dictionaries/token_dictionary.pkl").read_bytes()) == \
        pickle.loads((tmp_path / "outputs/together1/dictionaries/token_dictionary.pkl").read_bytes())


def test_max_tokens_bounds_every_batch_of_a_training_run(tiny_cfg, monkeypatch):
    from geneformer_colon.jobs.train import train
    from geneformer_colon.model.module import CellClassifier

    budget, shapes = 1000, {"train": [], "eval": []}
    training_step, eval_step = CellClassifier.training_step, CellClassifier._eval_step

    def train_batch(self, batch, batch_idx):
        shapes["train"].append(tuple(batch["input_ids"].shape))
        return training_step(self, batch, batch_idx)

    def eval_batch(self, split, batch):
        shapes["eval"].append(tuple(batch["input_ids"].shape))
        return eval_step(self, split, batch)

    monkeypatch.setattr(CellClassifier, "training_step", train_batch)
    monkeypatch.setattr(CellClassifier, "_eval_step", eval_batch)
    train(tiny_cfg("experiment=colon6", "logger=csv", f"data.max_tokens={budget}", "trainer.limit_train_batches=4"))
    for part in ("train", "eval"):  # cells x padded length within the budget, and the budget what bounds them
        sizes = [cells * length for cells, length in shapes[part]]
        assert shapes[part] and max(sizes) <= budget, (part, shapes[part])
        assert max(cells for cells, _ in shapes[part]) < tiny_cfg().data.batch_size
        assert max(sizes) > budget // 2, (part, shapes[part])


@pytest.mark.slow  # worker processes started with spawn import the package anew
def test_spawned_loader_workers_open_the_token_store_by_its_path(tiny_cfg):
    import torch
    from torch.utils.data import DataLoader

    from geneformer_colon.data.datamodule import pad_batch
    from geneformer_colon.data.samplers import EvalBatchSampler

    datamodule = datamodule_of(tiny_cfg())
    datamodule.setup("fit")
    dataset, store = datamodule.splits["val"], datamodule.store
    pickled = pickle.dumps(dataset)  # what each worker receives under spawn / forkserver
    assert len(pickled) < store.tokens.nbytes / 4, "the tokens travel in the pickle"
    copy = pickle.loads(pickled)
    assert isinstance(copy.store.tokens, np.memmap)
    assert str(copy.store.tokens.filename) == str(store.directory / "tokens.bin")
    sampler = EvalBatchSampler(datamodule.split_cells("val")["length"].to_numpy(), 16)
    alone = list(DataLoader(dataset, batch_sampler=sampler, collate_fn=pad_batch))
    spawned = list(DataLoader(dataset, batch_sampler=sampler, collate_fn=pad_batch, num_workers=2,
                              multiprocessing_context="spawn"))
    assert len(alone) == len(spawned) > 1
    for one, other in zip(alone, spawned):
        assert one.keys() == other.keys() and all(torch.equal(one[key], other[key]) for key in one)
    assert datamodule.loader_workers() == 0 and datamodule_of(tiny_cfg("data.num_workers=3")).loader_workers() == 3
