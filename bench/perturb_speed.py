"""Benchmark: in-silico perturbations (cell x gene) per second, batched against one variant a forward pass.

    python bench/perturb_speed.py [--shape v1|tiny|both] [--cells 4] [--length 512] [--genes 16]
                                  [--batch-size 64] [--threads 1] [--device cpu|cuda] [--small]

The model has random weights of the V1 shape (6 layers x 256, 4 heads, FFN 512; ``v1``) or of the
embedded default's (2 x 64, 2 heads, FFN 128; ``tiny``); its head, pooling and inference call are
the project's (``TrainedClassifier``). The cells are random rank lists of ``--length`` genes (a
perturbation's cost depends on the cell's length, not on which genes it holds: the lengths are
drawn between half and all of ``--length``, so batches that span cells pad a little), each holding
the same ``--genes`` genes at random ranks; every one of them is deleted in every cell.

Two ways, same cells, same perturbations, same threads (``torch.set_num_threads``):

- ``one at a time``: each perturbed cell through the model alone (the unperturbed pass once a cell);
- ``batched``: ``geneformer_colon.jobs.perturb.Perturber`` (a cell's variants built by one gather,
  stacked without padding, ``--batch-size`` variants a forward pass, cells by length).

Prints perturbations per second and the ratio, and checks that both give the same probability changes.
"""

from __future__ import annotations

import sys

# bench/tokenize.py shadows the standard library's `tokenize`: take this folder off the module path first.
sys.path = [entry for entry in sys.path if entry not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from geneformer_colon.assembly.trained_classifier import TrainedClassifier  # noqa: E402
from geneformer_colon.data.dictionaries import GeneDictionaries, TokenizerSettings  # noqa: E402
from geneformer_colon.data.tokenizer import TokenizedCells  # noqa: E402
from geneformer_colon.jobs.cell_choice import CellSet  # noqa: E402
from geneformer_colon.jobs.perturb import Columns, Perturber, perturbed_tokens  # noqa: E402
from geneformer_colon.model.backbone import Vocabulary, new_bert  # noqa: E402
from geneformer_colon.model.module import CellClassifier  # noqa: E402

SHAPES = {"v1": {"layers": 6, "hidden": 256, "heads": 4, "ffn": 512},
          "tiny": {"layers": 2, "hidden": 64, "heads": 2, "ffn": 128}}
VOCABULARY = 25_426  # V1's
CLASSES = ["Normal", "Border", "Tumor"]


@dataclass
class Setting:
    cells: int
    length: int
    genes: int
    batch_size: int


def random_model(shape: str, input_size: int, seed: int = 0) -> TrainedClassifier:
    torch.manual_seed(seed)
    token = {"<pad>": 0, "<mask>": 1, **{f"ENSG{i:011d}": i for i in range(2, VOCABULARY)}}
    dictionaries = GeneDictionaries(token, {gene: 1.0 for gene in token if not gene.startswith("<")})
    settings = TokenizerSettings("V1", input_size)
    vocabulary = Vocabulary(len(token), 0, input_size, dictionaries, "V1")
    size = SHAPES[shape]
    bert = new_bert(vocabulary, num_hidden_layers=size["layers"], hidden_size=size["hidden"],
                    num_attention_heads=size["heads"], intermediate_size=size["ffn"], hidden_act="relu")
    module = CellClassifier(bert_config=bert.config.to_dict(), class_names=CLASSES,
                            special_token_ids={"<pad>": 0, "<mask>": 1}, tokenizer={"model_version": "V1"},
                            bert=bert)
    return TrainedClassifier(module.eval(), dictionaries, settings, {"benchmark": shape})


def random_cells(setting: Setting, seed: int = 0) -> tuple[CellSet, Columns]:
    """Cells of random genes, each holding the same ``setting.genes`` genes at random ranks."""
    rng = np.random.default_rng(seed)
    shared = rng.choice(np.arange(2, VOCABULARY), setting.genes, replace=False)
    others = np.setdiff1d(np.arange(2, VOCABULARY), shared)
    cells = []
    for _ in range(setting.cells):
        length = int(rng.integers(max(setting.genes, setting.length // 2), setting.length + 1))
        cell = np.concatenate([shared, rng.choice(others, length - setting.genes, replace=False)])
        cells.append(rng.permutation(cell))
    offsets = np.concatenate([[0], np.cumsum([len(cell) for cell in cells])])
    tokens = TokenizedCells(np.concatenate(cells).astype(np.int64), offsets, 0)
    names = [f"ENSG{token:011d}" for token in shared]
    columns = Columns(names, [np.array([token]) for token in shared], [""] * len(names), [False] * len(names))
    return CellSet(tokens, np.arange(setting.cells), None), columns


def one_at_a_time(model: TrainedClassifier, cells: CellSet, columns: Columns, device: str) -> np.ndarray:
    deltas = []
    for row in cells.rows:
        cell = np.asarray(cells.tokens.cell_tokens(int(row)), dtype=np.int64)
        base = model.apply(TokenizedCells(cell, np.array([0, len(cell)]), 0), device=device)[0][0]
        for tokens in columns.tokens:
            variant = perturbed_tokens(cell, tokens, "delete", model.settings.resolved_input_size, False)
            single = TokenizedCells(variant, np.array([0, len(variant)]), 0)
            deltas.append(model.apply(single, device=device)[0][0] - base)
    return np.array(deltas)


def batched(model: TrainedClassifier, cells: CellSet, columns: Columns, batch_size: int, device: str) -> np.ndarray:
    base, embeddings = model.apply(cells.tokens, cells.rows, batch_size, device=device)
    done = Perturber(model, "delete", embeddings.mean(0), batch_size, device).run(cells, columns, base, embeddings)
    order = np.lexsort((done.column, done.cell))
    return done.delta[order]


def timed(run, device: str) -> tuple[np.ndarray, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def measure(shape: str, setting: Setting, device: str) -> list[tuple[str, float]]:
    model = random_model(shape, setting.length)
    model.module.to(device)
    cells, columns = random_cells(setting)
    n = setting.cells * setting.genes
    warm = Setting(1, min(setting.length, 64), min(setting.genes, 4), setting.batch_size)
    warm_cells, warm_columns = random_cells(warm, seed=1)
    batched(model, warm_cells, warm_columns, setting.batch_size, device)  # first-call costs out of the timing
    single, single_seconds = timed(lambda: one_at_a_time(model, cells, columns, device), device)
    batch, batch_seconds = timed(lambda: batched(model, cells, columns, setting.batch_size, device), device)
    difference = float(np.abs(single - batch).max())
    print(f"  largest difference of a probability change between the two: {difference:.2e}")
    return [("one at a time", n / single_seconds), (f"batched ({setting.batch_size} a pass)", n / batch_seconds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["v1", "tiny", "both"], default="both")
    parser.add_argument("--cells", type=int, default=4)
    parser.add_argument("--length", type=int, default=512, help="the longest cell (genes), also the input size")
    parser.add_argument("--genes", type=int, default=16, help="genes perturbed in every cell")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--small", action="store_true", help="a setting for CI (seconds)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setting = Setting(2, 64, 8, 16) if args.small else Setting(args.cells, args.length, args.genes, args.batch_size)
    shapes = ["v1", "tiny"] if args.shape == "both" else [args.shape]
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"{setting.cells} cells of {setting.length // 2}-{setting.length} genes, {setting.genes} genes deleted in "
          f"each; {device_name}")
    for shape in shapes:
        print(f"{shape} shape {SHAPES[shape]}:")
        rows = measure(shape, setting, args.device)
        for name, speed in rows:
            print(f"  {name:<28} {speed:10.1f} perturbations/s {speed / rows[0][1]:6.2f}x")


if __name__ == "__main__":
    main()
