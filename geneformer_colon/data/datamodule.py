"""The LightningDataModule: source -> dictionaries -> token store -> donor splits -> batches."""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from geneformer_colon.common.cpus import available_cpus
from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import atomic_path
from geneformer_colon.common.names import CLASS_SEPARATOR, SPLITS, TEST, TRAIN, VAL
from geneformer_colon.data.dictionaries import GeneDictionaries
from geneformer_colon.data.h5ad import CanonicalCells
from geneformer_colon.data.samplers import EvalBatchSampler, TrainBatchSampler
from geneformer_colon.data.sources import DataSource
from geneformer_colon.data.store import TokenStore, open_or_build_store
from geneformer_colon.data.token_rows import pad_tokens
from geneformer_colon.data.tokenizer import TokenizerSettings
from geneformer_colon.data.vocabulary import run_dictionaries

log = logging.getLogger(__name__)

STAGE_SPLITS = {"fit": (TRAIN, VAL), "validate": (VAL,), "test": (TEST,), "predict": (TEST,)}


class TokenDataset(Dataset):
    """Cells of one split: their tokens (read from the memory-mapped store), class index and donor index
    (the position of the cell's donor in the datamodule's ``donors``)."""

    def __init__(self, store: TokenStore, positions: np.ndarray, label_ids: np.ndarray, donor_ids: np.ndarray
                 ) -> None:
        self.store = store
        self.positions = positions
        self.label_ids = label_ids
        self.donor_ids = donor_ids

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item: int) -> dict[str, Any]:
        position = int(self.positions[item])
        return {"tokens": self.store.cell_tokens(position), "label": int(self.label_ids[item]), "index": position,
                "donor": int(self.donor_ids[item])}


def pad_batch(items: Sequence[dict[str, Any]], pad_id: int = 0, cells_per_batch: float | None = None
              ) -> dict[str, torch.Tensor]:
    """Pad a batch to its own longest cell (:func:`pad_tokens`), with each cell's class, store position and
    donor index. ``cells_per_batch`` (training with a token budget: the epoch's mean): the batch also carries
    ``loss_scale``, its cells over that mean, which the training step multiplies its (per-batch mean) loss by, so
    that every cell of an optimizer step weighs the same in the loss whatever the size of its batch."""
    input_ids, attention_mask = pad_tokens([item["tokens"] for item in items], pad_id)
    scale = {"loss_scale": torch.tensor(len(items) / cells_per_batch)} if cells_per_batch else {}
    return {**scale,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.tensor([item["label"] for item in items], dtype=torch.long),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "donors": torch.tensor([item["donor"] for item in items], dtype=torch.long),
    }


class ResumableDataLoader(DataLoader):
    """The training loader, with its place in the epoch: ``state_dict()`` / ``load_state_dict()``.

    After ``load_state_dict`` the next pass starts at the batch where the interrupted one stopped
    (if it is the same epoch), so no batch is trained on twice or skipped. The count is of batches
    delivered to the loop (worker processes may have prepared more).
    """

    batch_sampler: TrainBatchSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delivered = 0
        self.resume_at: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        start = 0
        if self.resume_at is not None and self.resume_at["epoch"] == self.batch_sampler.epoch:
            start = self.resume_at["batches"]
        self.resume_at = None
        self.batch_sampler.skip = start
        self.delivered = start
        for batch in super().__iter__():
            self.delivered += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.batch_sampler.epoch, "batches": self.delivered}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at = dict(state)
        self.batch_sampler.set_epoch(state["epoch"])


class CellDataModule(pl.LightningDataModule):
    """Donor-split cells of one data source, tokenized for Geneformer.

    Train is every donor not in ``val_donors`` or ``test_donors`` (or only ``train_donors`` of them,
    when given). ``labels`` names the
    classes and their order (cells of other labels are left out); ``None`` takes every class of the training
    donors' cells, sorted by name (listed in the log); ``use_labels=False`` reads no label at all
    (pretraining). ``cell_types`` optionally keeps only some cell types. When ``tokenizer`` names
    no token dictionary, a vocabulary and gene medians are derived from the training cells
    (``vocabulary``). ``max_tokens``: batches hold as many cells as fit that many padded tokens instead of
    ``batch_size`` / ``eval_batch_size`` cells (and a training batch's loss weighs its cells as :func:`pad_batch`
    says). ``num_workers``: loader worker processes (None: :meth:`loader_workers`).
    """

    def __init__(
        self,
        source: DataSource,
        tokenizer: dict[str, Any],
        labels: Sequence[str] | None = ("Normal", "Border", "Tumor"),
        use_labels: bool = True,
        val_donors: Sequence[str] = ("KUL19",),
        test_donors: Sequence[str] = ("KUL01",),
        train_donors: Sequence[str] | None = None,
        cell_types: Sequence[str] | None = None,
        balance_strategy: str = "none",
        batch_size: int = 16,
        eval_batch_size: int = 64,
        max_tokens: int | None = None,
        mega_batch_factor: int = 50,
        num_workers: int | None = None,
        seed: int = 0,
        cache_dir: str = "outputs/.cache",
    ) -> None:
        super().__init__()
        self.source = source
        self.tokenizer = dict(tokenizer)
        self.settings = TokenizerSettings(
            model_version=self.tokenizer.get("model_version", "V1"), input_size=self.tokenizer.get("input_size")
        )
        self.uses_labels = use_labels
        self._class_names = (list(labels) if labels is not None else None) if use_labels else []
        self.val_donors = list(val_donors or [])
        self.test_donors = list(test_donors or [])
        self.train_donors = list(train_donors) if train_donors else None
        self.cell_types = list(cell_types) if cell_types else None
        self.balance_strategy = balance_strategy
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_tokens = max_tokens
        self.mega_batch_factor = mega_batch_factor
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = Path(cache_dir)
        self.train_loader: ResumableDataLoader | None = None
        self._sampler: TrainBatchSampler | None = None
        self.resume_position: dict[str, int] | None = None
        self.cells: CanonicalCells | None = None
        self.store: TokenStore | None = None
        self.dictionaries: GeneDictionaries | None = None
        self.splits: dict[str, TokenDataset] = {}
        self.donors: list[str] = []

    # ---- building (rank 0 in prepare_data; every rank then opens what is on disk) ----

    def prepare_data(self) -> None:
        if self.store is None:
            self.store = self._open_store()

    def _open_store(self) -> TokenStore:
        self.cells = self.source.cells(self.cache_dir)
        self.dictionaries = run_dictionaries(self.tokenizer, self.settings.model_version, self.cells,
                                             self._training_rows, self.cache_dir)
        return open_or_build_store(self.cache_dir / "tokens", self.cells, self.dictionaries, self.settings)

    def _training_rows(self) -> np.ndarray:
        """The sorted positions of the training cells among the source's cells."""
        obs = self.cells.obs.assign(position=np.arange(len(self.cells.obs)))
        cells = self._filter_frame(obs)
        return np.sort(cells["position"].to_numpy()[self.split_of(cells) == TRAIN])

    def save_dictionaries(self, directory: Path) -> None:
        """The dictionaries in use, written where a run keeps them (atomically)."""
        with atomic_path(directory) as tmp:
            self.dictionaries.save(tmp)

    # ---- splits ----

    @property
    def class_names(self) -> list[str]:
        """``labels``, or with ``labels=None`` the classes of the training donors' cells (read once)."""
        if self._class_names is None:
            cells = self._kept_cell_types(self.source.cells(self.cache_dir).obs)
            self._class_names = sorted(cells["label"].astype(str)[self.split_of(cells) == TRAIN].unique())
            if not self._class_names:
                raise InputError(f"{self.source.describe()}: data.labels=null and the training donors have no cell; "
                                 "choose data.val_donors/data.test_donors that leave donors to train on")
            log.info("data.labels=null: the classes of the training donors are %s", self._class_names)
        joined = [name for name in self._class_names if CLASS_SEPARATOR in name]
        if joined:
            raise InputError(f"{self.source.describe()}: the classes {joined} hold '{CLASS_SEPARATOR}', which joins "
                             "the classes of a conformal set in one column; rename them in the label column (and "
                             "data.labels)")
        return self._class_names

    def _filter_frame(self, cells: pd.DataFrame) -> pd.DataFrame:
        """Check the donors, cell types and labels asked for; keep cells of those types and labels."""
        cells = self._kept_cell_types(cells)
        if not self.uses_labels:
            return cells
        present_labels = sorted(cells["label"].astype(str).unique())
        unknown_labels = sorted(set(self.class_names) - set(present_labels))
        if unknown_labels:
            raise InputError(
                f"{self.source.describe()}: data.labels names {unknown_labels}, absent from the label column "
                f"(labels present: {present_labels})"
            )
        left_out = ~cells["label"].isin(self.class_names)
        if left_out.any():
            log.info("leaving out %d cells whose label is not in data.labels", int(left_out.sum()))
        return cells[~left_out]

    def _kept_cell_types(self, cells: pd.DataFrame) -> pd.DataFrame:
        """Check the donors and cell types asked for; keep the cells of those types."""
        source = self.source.describe()
        donors = sorted(cells["donor"].astype(str).unique())
        for key, asked in (("data.val_donors", self.val_donors), ("data.test_donors", self.test_donors),
                           ("data.train_donors", self.train_donors or [])):
            unknown = sorted(set(asked) - set(donors))
            if unknown:
                raise InputError(f"{source}: {key} names unknown donor(s) {unknown}; donors present: {donors}")
        shared = sorted(set(self.val_donors) & set(self.test_donors)
                        | (set(self.train_donors or []) & set(self.val_donors + self.test_donors)))
        if shared:
            raise InputError(f"data.train_donors, val_donors and test_donors share {shared}; a donor belongs to "
                             "one split")
        if self.cell_types:
            present = sorted(cells["cell_type"].astype(str).unique())
            unknown = sorted(set(self.cell_types) - set(present))
            if unknown:
                raise InputError(f"{source}: data.cell_types names unknown {unknown}; cell types present: {present}")
            cells = cells[cells["cell_type"].isin(self.cell_types)]
        return cells

    def available_donors(self) -> list[str]:
        """The donors with cells of the kept labels and cell types (reads only the cells' obs)."""
        return sorted(self._filter_frame(self.source.cells(self.cache_dir).obs)["donor"].astype(str).unique())

    def split_of(self, cells: pd.DataFrame) -> np.ndarray:
        """Each cell's split by its donor ("" for a donor in none: not in train_donors when they are given)."""
        donors = cells["donor"]
        training = donors.isin(self.train_donors).to_numpy() if self.train_donors else True
        return np.where(donors.isin(self.val_donors), VAL,
                        np.where(donors.isin(self.test_donors), TEST, np.where(training, TRAIN, "")))

    def setup(self, stage: str | None = None) -> None:
        """Split by donor. Every class must have cells in each split the stage uses
        (fit: train and val; validate: val; test: test; None: all three)."""
        if not self.splits:
            if self.store is None:
                self.store = self._open_store()
            cells = self._filter_frame(self.store.cells)
            if self.uses_labels:
                label_ids = cells["label"].map({name: i for i, name in enumerate(self.class_names)}).to_numpy()
            else:
                label_ids = np.full(len(cells), -1)
            donor_split = self.split_of(cells)
            self.donors = sorted(cells["donor"].astype(str).unique())
            donor_ids = cells["donor"].astype(str).map({name: i for i, name in enumerate(self.donors)}).to_numpy()
            for split in SPLITS:
                in_split = donor_split == split
                self.splits[split] = TokenDataset(self.store, cells.index.to_numpy()[in_split], label_ids[in_split],
                                                  donor_ids[in_split])
            log.info("cells per split: %s", {split: len(data) for split, data in self.splits.items()})
        for split in STAGE_SPLITS.get(stage, SPLITS):
            self._check_split(split)

    def _check_split(self, split: str) -> None:
        if split == TEST and not self.test_donors:
            return  # no donor asked for it: pretraining has no test split (eval.py no validation split: not set up)
        if split == VAL and not self.val_donors:
            raise InputError("data.val_donors is []: the best epoch is picked on held-out donors; name at least one "
                             f"(donors: {sorted(self.store.cells['donor'].astype(str).unique())})")
        if len(self.splits[split]) == 0:
            raise InputError(
                f"{self.store.source}: the {split} split has no cell (data.val_donors={self.val_donors}, "
                f"data.test_donors={self.test_donors}, data.cell_types={self.cell_types}); choose donors that "
                "have cells of the kept labels and cell types"
            )
        if not self.uses_labels:
            return
        present = set(self.splits[split].label_ids.tolist())
        for class_id, name in enumerate(self.class_names):
            if class_id not in present:
                raise InputError(
                    f"{self.store.source}: class {name!r} has no cell in the {split} split "
                    f"(donors {self.split_donors(split)}, data.cell_types={self.cell_types}); choose other "
                    "data.val_donors/data.test_donors or drop the class from data.labels"
                )

    def training_on(self, dataset: TokenDataset) -> CellDataModule:
        """A copy that trains on ``dataset`` (self-training's labelled and pseudo-labelled cells); the store and the
        other splits shared."""
        trained = copy.copy(self)
        trained.splits = {**self.splits, TRAIN: dataset}
        trained.train_loader, trained._sampler, trained.resume_position = None, None, None
        return trained

    def split_cells(self, split: str) -> pd.DataFrame:
        """The store's metadata rows of a split, in dataset order (for prediction files)."""
        return self.store.cells.iloc[self.splits[split].positions]

    def split_donors(self, split: str) -> list[str]:
        return sorted(self.split_cells(split)["donor"].unique())

    @property
    def special_token_ids(self) -> dict[str, int]:
        return dict(self.store.meta["special_tokens"])

    # ---- loaders ----

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _on_gpu(self) -> bool:
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def loader_workers(self) -> int:
        """``num_workers``, or with null: on a GPU one worker a CPU available but one (at most 8), preparing batches
        while the GPU computes; on the CPU none (a worker would take the cores the model's threads compute on)."""
        if self.num_workers is not None:
            return self.num_workers
        return min(8, available_cpus() - 1) if self._on_gpu() else 0

    def _loader(self, dataset: TokenDataset, batch_sampler: Any, loader: type[DataLoader] = DataLoader,
                cells_per_batch: float | None = None) -> DataLoader:
        """Workers open the token store again by its path (:meth:`TokenStore.__reduce__`), never a copy of its
        tokens; batches in pinned memory on a GPU."""
        workers = self.loader_workers()
        return loader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=functools.partial(pad_batch, cells_per_batch=cells_per_batch),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self._on_gpu(),
        )

    def train_sampler(self, rank: int = 0, world_size: int = 1, epochs: int = 1) -> TrainBatchSampler:
        dataset = self.splits[TRAIN]
        cells = self.split_cells(TRAIN)
        return TrainBatchSampler(
            labels=dataset.label_ids,
            donors=cells["donor"].to_numpy(),
            lengths=cells["length"].to_numpy(),
            batch_size=self.batch_size,
            strategy=self.balance_strategy,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            mega_batch_factor=self.mega_batch_factor,
            max_tokens=self.max_tokens,
            epochs=epochs,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        trainer = getattr(self, "trainer", None)
        epochs = max(trainer.max_epochs or 1, 1) if trainer is not None else 1
        if self._sampler is None or (self._sampler.rank, self._sampler.world_size, self._sampler.epochs) != (
                rank, world, epochs):  # planning a token budget's epochs once per fit, not per request
            self._sampler = self.train_sampler(rank, world, epochs)
        cells_per_batch = self._sampler.share_size / len(self._sampler) if self.max_tokens is not None else None
        self.train_loader = self._loader(self.splits[TRAIN], self._sampler, ResumableDataLoader, cells_per_batch)
        if self.resume_position is not None:
            self.train_loader.load_state_dict(self.resume_position)
            self.resume_position = None
        return self.train_loader

    # ---- the training loader's place in its epoch, in checkpoints ----
    # Lightning restores a datamodule's state before it asks for any loader (it asks for the training
    # loader early, to count the optimizer steps, before loops and loader states are restored), so
    # the position travels here and reaches the loader as it is made.

    def state_dict(self) -> dict[str, Any]:
        return {"train_position": self.train_loader.state_dict()} if self.train_loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resume_position = state.get("train_position")

    def eval_dataloader(self, split: str) -> DataLoader:
        rank, world = self._rank_and_world()
        lengths = self.split_cells(split)["length"].to_numpy()
        if len(lengths) < world:
            raise InputError(f"{self.store.source}: the {split} split has {len(lengths)} cells, fewer than the "
                             f"{world} processes that evaluate it; use fewer devices or more {split} donors")
        sampler = EvalBatchSampler(lengths, self.eval_batch_size, rank, world, max_tokens=self.max_tokens)
        return self._loader(self.splits[split], sampler)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader(VAL)

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader(TEST)
