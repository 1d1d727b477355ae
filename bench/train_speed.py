"""Benchmark: cells per second of one training epoch, this project's loop against a plain Hugging Face Trainer.

    python bench/train_speed.py [--cells 2000] [--genes 33694] [--input-size 2048] [--layers 2] [--hidden 64]
                                [--heads 2] [--ffn 128] [--small]

The cells are a synthetic cohort tokenized by the project (with the full gene count, a cell has a
few hundred to several thousand genes, as in 10x data; truncated at the input size). Both loops
train the same model shape (``model=tiny`` unless --layers/--hidden say otherwise) for one epoch
on the same tokens, in this process, with the same number of threads:

- the Trainer recipe of Geneformer's classifier: ``BertForSequenceClassification``, batches of 12 in
  random order, each padded to its longest cell (transformers' public API only);
- this project: ``CellClassifier`` in Lightning, batches of 12 grouped by length, with the samplers
  ``none``, ``class`` and ``class_donor``, and with a token budget (``data.max_tokens``).

Prints cells/s of each and its ratio to the Trainer's (on a GPU, the peak memory too). ``--small`` is a
setting for CI (seconds).
Validation is off in both: only the training epoch is timed (from its first batch to its end).
"""

from __future__ import annotations

import sys

# bench/tokenize.py shadows the standard library's `tokenize`: take this folder off the module path first.
sys.path = [entry for entry in sys.path if entry not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from geneformer_colon.assembly.builders import build_datamodule, build_module, resolve_precision  # noqa: E402
from geneformer_colon.common.console import quiet_libraries  # noqa: E402
from geneformer_colon.runs.config import CONF_DIR  # noqa: E402

BATCH = 12  # Geneformer's classifier default


class Clock:
    """Seconds from the first training batch to the epoch's end."""

    def __init__(self) -> None:
        self.started = self.seconds = 0.0

    def start(self) -> None:
        self.started = self.started or time.perf_counter()

    def stop(self) -> None:
        self.seconds = time.perf_counter() - self.started


class LightningClock(pl.Callback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_start(self, *args, **kwargs) -> None:
        self.clock.start()

    def on_train_epoch_end(self, *args, **kwargs) -> None:
        self.clock.stop()


class TrainerClock(TrainerCallback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_step_begin(self, *args, **kwargs) -> None:
        self.clock.start()

    def on_epoch_end(self, *args, **kwargs) -> None:
        self.clock.stop()


class StoreCells(Dataset):
    """The training cells of the project's token store, as the Trainer recipe reads them."""

    def __init__(self, datamodule) -> None:
        self.store = datamodule.store
        self.split = datamodule.splits["train"]

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: int) -> dict:
        tokens = np.asarray(self.store.cell_tokens(int(self.split.positions[item])), dtype=np.int64)
        return {"input_ids": tokens, "labels": int(self.split.label_ids[item])}


def pad_to_longest(items: list[dict]) -> dict:
    """Geneformer's classifier collator: each batch padded to its longest cell."""
    longest = max(len(item["input_ids"]) for item in items)
    input_ids = torch.zeros((len(items), longest), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, item in enumerate(items):
        input_ids[row, : len(item["input_ids"])] = torch.from_numpy(item["input_ids"])
        attention_mask[row, : len(item["input_ids"])] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": torch.tensor([item["labels"] for item in items])}


def trainer_recipe(datamodule, cfg, work: Path) -> float:
    architecture = cfg.model.encoder
    config = BertConfig(vocab_size=len(datamodule.dictionaries.token), hidden_size=architecture.hidden_size,
                        num_hidden_layers=architecture.num_hidden_layers,
                        num_attention_heads=architecture.num_attention_heads,
                        intermediate_size=architecture.intermediate_size, hidden_act=architecture.hidden_act,
                        max_position_embeddings=datamodule.settings.resolved_input_size,
                        num_labels=len(datamodule.class_names), attn_implementation="sdpa")
    torch.manual_seed(0)
    clock = Clock()
    arguments = TrainingArguments(output_dir=str(work / "hf"), per_device_train_batch_size=BATCH, num_train_epochs=1,
                                  learning_rate=5e-5, report_to="none", save_strategy="no", logging_strategy="no",
                                  disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
                                  bf16=torch.cuda.is_available(), seed=0)
    Trainer(model=BertForSequenceClassification(config), args=arguments, train_dataset=StoreCells(datamodule),
            data_collator=pad_to_longest, callbacks=[TrainerClock(clock)]).train()
    return len(datamodule.splits["train"]) / clock.seconds


def project_loop(cfg) -> float:
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    clock = Clock()
    trainer = pl.Trainer(max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[LightningClock(clock)], precision=resolve_precision("auto"))
    trainer.fit(module, datamodule=datamodule)
    return len(datamodule.splits["train"]) / clock.seconds


def measured(loop, *arguments) -> tuple[float, float | None]:
    """The loop's cells/s, and on a GPU its peak memory in GiB."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    speed = loop(*arguments)
    return speed, torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def row(name: str, speed: float, ratio: float, peak: float | None) -> str:
    return f"{name:<46} {speed:>8.1f} {ratio:>10.2f}" + (f" {peak:>9.2f}" if peak is not None else "")


def loop_configs(args: argparse.Namespace, work: Path) -> dict:
    """The project's training config for each sampler (and the token budget), on the benchmark's cells."""
    budget = args.max_tokens or BATCH * args.input_size // 2
    common = [f"paths.output_dir={work}", f"paths.data_dir={args.dir}", f"paths.cache_dir={args.dir / 'cache'}",
              f"data.source.n_cells={args.cells}", f"data.source.n_genes={args.genes}", "data.test_donors=[]",
              f"model.tokenizer.input_size={args.input_size}", f"model.encoder.num_hidden_layers={args.layers}",
              f"model.encoder.hidden_size={args.hidden}", f"model.encoder.num_attention_heads={args.heads}",
              f"model.encoder.intermediate_size={args.ffn or 2 * args.hidden}",
              f"data.batch_size={BATCH}", "data.mega_batch_factor=50"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return {name: compose("train", overrides=common + extra) for name, extra in (
            ("none", ["data.balance_strategy=none"]),
            ("class", ["data.balance_strategy=class"]),
            ("class_donor", ["data.balance_strategy=class_donor"]),
            (f"class_donor, max_tokens={budget}", ["data.balance_strategy=class_donor", f"data.max_tokens={budget}"]),
        )}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--genes", type=int, default=33_694)
    parser.add_argument("--input-size", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=None, help="intermediate size (default: 2 x hidden)")
    parser.add_argument("--max-tokens", type=int, default=None, help="token budget (default: 6 x the input size)")
    parser.add_argument("--small", action="store_true", help="a few hundred small cells: seconds, for CI")
    parser.add_argument("--dir", type=Path, default=Path("data/bench"))
    args = parser.parse_args()
    if args.small:
        args.cells, args.genes, args.input_size = 300, 4000, 512
    quiet_libraries()
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="speed-", dir=args.dir))
    try:
        configs = loop_configs(args, work)
        datamodule = build_datamodule(configs["none"])
        lengths = datamodule.split_cells("train")["length"]
        print(f"{len(lengths)} training cells, {lengths.min()}-{lengths.max()} tokens a cell "
              f"(mean {lengths.mean():.0f}); "
              f"model {args.layers} layers x {args.hidden} ({args.heads} heads); {torch.get_num_threads()} threads; "
              f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
        reference, peak = measured(trainer_recipe, datamodule, configs["none"], work)
        print(f"{'loop':<46} {'cells/s':>8} {'x Trainer':>10}" + (f" {'peak GiB':>9}" if peak is not None else ""))
        print(row("HF Trainer, random order, padded to longest", reference, 1.0, peak))
        for name, cfg in configs.items():
            speed, peak = measured(project_loop, cfg)
            print(row(f"this project, {name}", speed, speed / reference, peak))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
