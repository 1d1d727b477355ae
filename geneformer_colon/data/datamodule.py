"""The LightningDataModule: source -> dictionaries -> token store -> donor splits -> batches."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from geneformer_colon.data.dictionaries import GeneDictionaries, derive_dictionaries
from geneformer_colon.data.samplers import EvalBatchSampler, TrainBatchSampler
from geneformer_colon.data.sources import DataSource
from geneformer_colon.data.store import TokenStore, open_or_build_store
from geneformer_colon.data.tokenizer import TokenizerSettings
from geneformer_colon.errors import InputError
from geneformer_colon.io import atomic_path, file_fingerprint

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class TokenDataset(Dataset):
    """Cells of one split: their tokens (read from the memory-mapped store) and class index."""

    def __init__(self, store: TokenStore, positions: np.ndarray, label_ids: np.ndarray) -> None:
        self.store = store
        self.positions = positions
        self.label_ids = label_ids

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item: int) -> dict[str, Any]:
        position = int(self.positions[item])
        return {"tokens": self.store.cell_tokens(position), "label": int(self.label_ids[item]), "index": position}


def pad_batch(items: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad a batch to its own longest cell; attention_mask marks the real tokens."""
    longest = max(len(item["tokens"]) for item in items)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, item in enumerate(items):
        length = len(item["tokens"])
        input_ids[row, :length] = torch.from_numpy(np.asarray(item["tokens"], dtype=np.int64))
        attention_mask[row, :length] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.tensor([item["label"] for item in items], dtype=torch.long),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }


class CellDataModule(pl.LightningDataModule):
    """Donor-split cells of one data source, tokenized for Geneformer.

    Train is every donor not in ``val_donors`` or ``test_donors``. ``labels`` names the
    classes and their order (cells of other labels are left out); ``cell_types`` optionally
    keeps only some cell types. When ``tokenizer`` names no token dictionary, a vocabulary and
    gene medians are derived from the training cells and cached.
    """

    def __init__(
        self,
        source: DataSource,
        tokenizer: dict[str, Any],
        labels: Sequence[str] = ("Normal", "Border", "Tumor"),
        val_donors: Sequence[str] = ("KUL19",),
        test_donors: Sequence[str] = ("KUL01",),
        cell_types: Sequence[str] | None = None,
        balance_strategy: str = "none",
        batch_size: int = 16,
        eval_batch_size: int = 64,
        mega_batch_factor: int = 50,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str = "outputs/.cache",
    ) -> None:
        super().__init__()
        self.source = source
        self.tokenizer = dict(tokenizer)
        self.settings = TokenizerSettings(
            model_version=self.tokenizer.get("model_version", "V1"), input_size=self.tokenizer.get("input_size")
        )
        self.class_names = list(labels)
        self.val_donors = list(val_donors)
        self.test_donors = list(test_donors)
        self.cell_types = list(cell_types) if cell_types else None
        self.balance_strategy = balance_strategy
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.mega_batch_factor = mega_batch_factor
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = Path(cache_dir)
        self.store: TokenStore | None = None
        self.dictionaries: GeneDictionaries | None = None
        self.splits: dict[str, TokenDataset] = {}

    # ---- building (rank 0 in prepare_data; every rank then opens what is on disk) ----

    def prepare_data(self) -> None:
        if self.store is None:
            self.store = self._open_store()

    def _open_store(self) -> TokenStore:
        h5ad_path = self.source.h5ad(self.cache_dir)
        fingerprint = file_fingerprint(h5ad_path)
        # Read at most once, and only if a dictionary or the store must be built (or asked for).
        self.read_adata = cache(lambda: ad.read_h5ad(h5ad_path))
        self.dictionaries = self._load_dictionaries(h5ad_path, fingerprint, self.read_adata)
        return open_or_build_store(
            self.cache_dir / "tokens", h5ad_path, fingerprint, self.read_adata, self.dictionaries, self.settings
        )

    def _load_dictionaries(self, h5ad_path: Path, fingerprint: str, read_adata) -> GeneDictionaries:
        if self.tokenizer.get("token_dictionary"):
            if not self.tokenizer.get("gene_median_dictionary"):
                raise InputError(
                    "model.tokenizer.gene_median_dictionary: not set; a token dictionary needs its "
                    "gene median dictionary (gene_median_dictionary_gc30M.pkl for V1, _gc104M for V2)"
                )
            return GeneDictionaries.load(
                self.tokenizer["token_dictionary"],
                self.tokenizer["gene_median_dictionary"],
                self.tokenizer.get("gene_mapping"),
            )
        key_parts = [fingerprint, self.settings.model_version, sorted(self.val_donors), sorted(self.test_donors)]
        key_parts.append(sorted(self.cell_types) if self.cell_types else None)
        directory = self.cache_dir / "dictionaries" / hashlib.sha256(repr(key_parts).encode()).hexdigest()[:16]
        if not (directory / "token_dictionary.pkl").is_file():
            adata = read_adata()
            cells = self._filter_frame(adata.obs, source=str(h5ad_path))
            train = ~cells["donor"].isin(self.val_donors + self.test_donors)
            log.info("deriving a vocabulary and gene medians from %d training cells", int(train.sum()))
            derived = derive_dictionaries(adata[cells.index[train]], model_version=self.settings.model_version)
            with atomic_path(directory) as tmp:
                derived.save(tmp)
        return GeneDictionaries.load(directory / "token_dictionary.pkl", directory / "gene_median_dictionary.pkl")

    # ---- splits ----

    def _filter_frame(self, cells: pd.DataFrame, source: str) -> pd.DataFrame:
        """Check the donors, cell types and labels asked for; keep cells of those types and labels."""
        donors = sorted(cells["donor"].astype(str).unique())
        for key, asked in (("data.val_donors", self.val_donors), ("data.test_donors", self.test_donors)):
            unknown = sorted(set(asked) - set(donors))
            if unknown:
                raise InputError(f"{source}: {key} names unknown donor(s) {unknown}; donors present: {donors}")
        shared = sorted(set(self.val_donors) & set(self.test_donors))
        if shared:
            raise InputError(f"data.val_donors and data.test_donors share {shared}; a donor belongs to one split")
        if self.cell_types:
            present = sorted(cells["cell_type"].astype(str).unique())
            unknown = sorted(set(self.cell_types) - set(present))
            if unknown:
                raise InputError(f"{source}: data.cell_types names unknown {unknown}; cell types present: {present}")
            cells = cells[cells["cell_type"].isin(self.cell_types)]
        unknown_labels = sorted(set(self.class_names) - set(cells["label"].astype(str).unique()))
        if unknown_labels:
            raise InputError(
                f"{source}: data.labels names {unknown_labels}, absent from the label column "
                f"(labels present: {sorted(cells['label'].astype(str).unique())})"
            )
        left_out = ~cells["label"].isin(self.class_names)
        if left_out.any():
            log.info("leaving out %d cells whose label is not in data.labels", int(left_out.sum()))
        return cells[~left_out]

    def setup(self, stage: str | None = None) -> None:
        """Split by donor. Every class must have cells in each split the stage uses
        (fit: train and val; validate: val; test: test; None: all three)."""
        if not self.splits:
            if self.store is None:
                self.store = self._open_store()
            cells = self._filter_frame(self.store.cells, source=str(self.store.meta["source"]))
            label_ids = cells["label"].map({name: i for i, name in enumerate(self.class_names)}).to_numpy()
            donor_split = np.where(
                cells["donor"].isin(self.val_donors),
                "val",
                np.where(cells["donor"].isin(self.test_donors), "test", "train"),
            )
            for split in SPLITS:
                in_split = donor_split == split
                self.splits[split] = TokenDataset(self.store, cells.index.to_numpy()[in_split], label_ids[in_split])
            log.info("cells per split: %s", {split: len(data) for split, data in self.splits.items()})
        for split in STAGE_SPLITS.get(stage, SPLITS):
            self._check_classes(split)

    def _check_classes(self, split: str) -> None:
        present = set(self.splits[split].label_ids.tolist())
        for class_id, name in enumerate(self.class_names):
            if class_id not in present:
                donors = sorted(self.split_cells(split)["donor"].unique())
                raise InputError(
                    f"{self.store.meta['source']}: class {name!r} has no cell in the {split} split "
                    f"(donors {donors}, data.cell_types={self.cell_types}); choose other "
                    "data.val_donors/data.test_donors or drop the class from data.labels"
                )

    def split_cells(self, split: str) -> pd.DataFrame:
        """The store's metadata rows of a split, in dataset order (for prediction files)."""
        return self.store.cells.iloc[self.splits[split].positions]

    @property
    def special_token_ids(self) -> dict[str, int]:
        return dict(self.store.meta["special_tokens"])

    # ---- loaders ----

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset: TokenDataset, batch_sampler) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=pad_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.splits["train"]
        rank, world = self._rank_and_world()
        cells = self.split_cells("train")
        sampler = TrainBatchSampler(
            labels=dataset.label_ids,
            donors=cells["donor"].to_numpy(),
            lengths=cells["length"].to_numpy(),
            batch_size=self.batch_size,
            strategy=self.balance_strategy,
            seed=self.seed,
            rank=rank,
            world_size=world,
            mega_batch_factor=self.mega_batch_factor,
        )
        return self._loader(dataset, sampler)

    def _eval_loader(self, split: str) -> DataLoader:
        rank, world = self._rank_and_world()
        lengths = self.split_cells(split)["length"].to_numpy()
        return self._loader(self.splits[split], EvalBatchSampler(lengths, self.eval_batch_size, rank, world))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
