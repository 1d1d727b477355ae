"""Benchmark: in-silico perturbations (cell x gene) per second: the project's path against one variant a forward
pass and against a plain batched forward of the same variants; and shards in two processes against one.

    python bench/perturb_speed.py [--shape v1|tiny|both] [--cells 4] [--length 512] [--genes 16]
                                  [--batch-size 64] [--threads 1] [--device cpu|cuda] [--shards 2] [--small]

The model has random weights of the V1 shape (6 layers x 256, 4 heads, FFN 512; ``v1``) or of the
embedded default's (2 x 64, 2 heads, FFN 128; ``tiny``); its head, pooling and inference call are
the project's (``TrainedClassifier``). The cells are random rank lists of ``--length`` genes (a
perturbation's cost depends on the cell's length, not on which genes it holds: the lengths are
drawn between half and all of ``--length``, so batches that span cells pad a little), each holding
the same ``--genes`` genes at random ranks; every one of them is deleted in every cell.

Three ways, same cells, same perturbations, same threads (``torch.set_num_threads``):

- ``one at a time``: each perturbed cell through the model alone (the unperturbed pass once a cell);
- ``plain batched forward``: every variant built beforehand (not timed), then ``--batch-size`` of them a forward
  pass, by length across cells (padded to the longest of the batch), and the unperturbed cells likewise: the
  forward passes alone, what no perturbation code can beat by much;
- ``batched``: ``geneformer_colon.jobs.perturber.Perturber`` (a cell's variants built by one gather, stacked without
  padding, ``--batch-size`` variants a forward pass, one cell a batch, its unperturbed pass alone).

Prints perturbations per second and each way's ratio to the first and to the plain forward, and checks that all
give the same probability changes. ``--shards N``: the batched way again, the cells dealt into N shares of equal
work (``perturb_shards.share``) and run in N spawned processes of ``--threads`` each, against one process: the
speed-up of the compute (the slowest process) and of the wall time with the processes' start.
"""

from __future__ import annotations

import sys

# bench/tokenize.py shadows the standard library's `tokenize`: take this folder off the module path first.
sys.path = [entry for entry in sys.path if entry not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from geneformer_colon.assembly.trained_classifier import TrainedClassifier  # noqa: E402
from geneformer_colon.data.dictionaries import GeneDictionaries, TokenizerSettings  # noqa: E402
from geneformer_colon.data.token_rows import pad_tokens  # noqa: E402
from geneformer_colon.data.tokenizer import TokenizedCells  # noqa: E402
from geneformer_colon.jobs.cell_choice import CellSet  # noqa: E402
from geneformer_colon.jobs.perturb_columns import Columns  # noqa: E402
from geneformer_colon.jobs.perturb_shards import share  # noqa: E402
from geneformer_colon.jobs.perturber import Perturber  # noqa: E402
from geneformer_colon.model.backbone import Vocabulary, new_bert  # noqa: E402
from geneformer_colon.model.module import CellClassifier  # noqa: E402
from geneformer_colon.model.perturbations import perturbed_tokens  # noqa: E402

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


def batched(model: TrainedClassifier, cells: CellSet, columns: Columns, batch_size: int, device: str,
            positions: np.ndarray | None = None) -> np.ndarray:
    """The project's path over the cells at ``positions`` (default all): probability changes, by cell and gene."""
    centroid = np.ones(model.hidden_size, dtype=np.float32)
    positions = np.arange(len(cells.rows)) if positions is None else positions
    done = Perturber(model, "delete", centroid, batch_size, device).run(cells, positions, columns)
    order = np.lexsort((done["column"], done["cell"]))
    return done["delta"][order]


def variants_of(model: TrainedClassifier, cells: CellSet, columns: Columns) -> tuple[list[np.ndarray], np.ndarray]:
    """Every deleted variant (cell by cell, genes in column order) and the cell each comes from."""
    rows, owner = [], []
    for index, row in enumerate(cells.rows):
        cell = np.asarray(cells.tokens.cell_tokens(int(row)), dtype=np.int64)
        for tokens in columns.tokens:
            rows.append(perturbed_tokens(cell, tokens, "delete", model.settings.resolved_input_size, False))
            owner.append(index)
    return rows, np.asarray(owner)


def plain_forward(model: TrainedClassifier, cells: CellSet, variants: list[np.ndarray], owner: np.ndarray,
                  batch_size: int, device: str) -> np.ndarray:
    """``batch_size`` variants a forward pass, by length across cells; the same for the unperturbed cells."""
    base = model.apply(cells.tokens, cells.rows, batch_size, device=device)[0]
    probabilities = np.empty((len(variants), base.shape[1]))
    order = np.argsort([-len(row) for row in variants], kind="stable")
    for start in range(0, len(order), batch_size):
        part = order[start: start + batch_size]
        probabilities[part] = model.infer(*pad_tokens([variants[i][None, :] for i in part], model.pad_id), device)[0]
    return probabilities - base[owner]


def shard_worker(arguments: tuple[str, Setting, int, int, int]) -> float:
    """One shard's compute seconds, in a process of its own (the model and cells rebuilt from their seeds)."""
    shape, setting, index, count, threads = arguments
    torch.set_num_threads(threads)
    model = random_model(shape, setting.length)
    cells, columns = random_cells(setting)
    costs = Perturber(model, "delete", np.ones(model.hidden_size, np.float32)).count(cells, columns)
    positions = share(costs * cells.tokens.lengths[cells.rows], index, count)
    started = time.perf_counter()
    batched(model, cells, columns, setting.batch_size, "cpu", positions)
    return time.perf_counter() - started


def shard_speedup(shape: str, setting: Setting, count: int, threads: int) -> None:
    """The batched way in ``count`` spawned processes against one (each ``threads`` threads)."""
    context = multiprocessing.get_context("spawn")
    walls = {}
    for processes in (1, count):
        started = time.perf_counter()
        with context.Pool(processes) as pool:
            seconds = pool.map(shard_worker, [(shape, setting, index, processes, threads)
                                              for index in range(processes)])
        walls[processes] = (max(seconds), time.perf_counter() - started)
    compute = walls[1][0] / walls[count][0]
    wall = walls[1][1] / walls[count][1]
    print(f"  {count} shards in {count} processes: compute {walls[count][0]:.1f} s against {walls[1][0]:.1f} s in one "
          f"({compute:.2f}x); wall with the processes' start {walls[count][1]:.1f} s against {walls[1][1]:.1f} s "
          f"({wall:.2f}x)")


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
    variants, owner = variants_of(model, cells, columns)
    single, single_seconds = timed(lambda: one_at_a_time(model, cells, columns, device), device)
    plain, plain_seconds = timed(lambda: plain_forward(model, cells, variants, owner, setting.batch_size, device),
                                 device)
    batch, batch_seconds = timed(lambda: batched(model, cells, columns, setting.batch_size, device), device)
    difference = max(float(np.abs(single - batch).max()), float(np.abs(plain - batch).max()))
    print(f"  largest difference of a probability change between the three: {difference:.2e}")
    return [("one at a time", n / single_seconds), (f"plain batched forward ({setting.batch_size} a pass)",
                                                    n / plain_seconds),
            (f"batched ({setting.batch_size} a pass)", n / batch_seconds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["v1", "tiny", "both"], default="both")
    parser.add_argument("--cells", type=int, default=4)
    parser.add_argument("--length", type=int, default=512, help="the longest cell (genes), also the input size")
    parser.add_argument("--genes", type=int, default=16, help="genes perturbed in every cell")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shards", type=int, default=0, help="also the batched way in this many processes (CPU)")
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
            print(f"  {name:<36} {speed:10.1f} perturbations/s {speed / rows[0][1]:6.2f}x {speed / rows[1][1]:6.2f}x "
                  "plain")
        if args.shards > 1:
            shard_speedup(shape, setting, args.shards, args.threads)


if __name__ == "__main__":
    main()
