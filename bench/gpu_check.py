"""The GPU check: Geneformer V2-104M's shape on one GPU, random weights, through the project's own code paths.

    python bench/gpu_check.py            # make gpu-check: at most about 8 minutes on one H100; installs nothing
    python bench/gpu_check.py --smoke    # tiny shapes on the CPU in seconds (the test that it runs)

Prints, for a V2-104M-shaped ``CellClassifier`` (12 x 768, input 4,096, <cls>/<eos> framing) on synthetic cells of
800 to 4,096 tokens:

- training (bf16 autocast, AdamW, SDPA with the (batch, 1, 1, L) padding mask) in cells/s and peak GiB with token
  budgets of 12 and 24 full-length cells, without and with activation checkpointing (the training sampler's
  length-grouped batches and the loss scaling of ``data.max_tokens``);
- ``predict``'s forward (``TrainedClassifier.apply``: token budget, bf16, out-of-memory halving) in cells/s;
- ``perturb``'s forward: every cell's single-gene deletions (``TrainedClassifier.infer`` on padded variants) in
  perturbations/s;
- ``explain``'s integrated gradients (``jobs/explain.integrated_gradients``, 32 steps) in cells/s.

Each figure is timed after a warm-up and within a time budget, so the whole check ends in minutes.
"""

from __future__ import annotations

import sys

# bench/tokenize.py shadows the standard library's `tokenize`: take this folder off the module path first; the
# repository's root on it (the package imports from a clone without an install).
sys.path = [__file__.rsplit("/", 2)[0] or "."] + [entry for entry in sys.path
                                                   if entry not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from geneformer_colon.assembly.trained_classifier import TrainedClassifier  # noqa: E402
from geneformer_colon.common.console import quiet_libraries  # noqa: E402
from geneformer_colon.data.datamodule import pad_batch  # noqa: E402
from geneformer_colon.data.dictionaries import GeneDictionaries  # noqa: E402
from geneformer_colon.data.samplers import TrainBatchSampler  # noqa: E402
from geneformer_colon.data.token_rows import pad_tokens  # noqa: E402
from geneformer_colon.data.tokenizer import TokenizedCells, TokenizerSettings  # noqa: E402
from geneformer_colon.jobs.cell_choice import CellSet  # noqa: E402
from geneformer_colon.jobs.explain import integrated_gradients  # noqa: E402
from geneformer_colon.model.backbone import Vocabulary, new_bert  # noqa: E402
from geneformer_colon.model.module import CellClassifier  # noqa: E402


@dataclass(frozen=True)
class Scale:
    """The check's shapes and amounts: V2-104M's (``full``), or tiny ones (``smoke``)."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    input_size: int
    shortest: int
    cells: int
    steps: int
    seconds: float
    budgets: tuple[int, ...]
    genes_perturbed: int
    explained: int
    ig_steps: int


FULL = Scale(12, 768, 12, 3072, 20_275, 4096, 800, 2048, 30, 45.0, (12 * 4096, 24 * 4096), 64, 16, 32)
SMOKE = Scale(2, 32, 2, 64, 300, 128, 20, 96, 3, 5.0, (12 * 128, 24 * 128), 4, 4, 4)


def synthetic_cells(scale: Scale, seed: int = 0) -> TokenizedCells:
    """Cells of ``shortest`` to ``input_size`` tokens, <cls> first and <eos> last, distinct genes each."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(scale.shortest, scale.input_size + 1, scale.cells)
    cells = [np.concatenate([[2], rng.choice(np.arange(4, scale.vocab), length - 2, replace=False), [3]])
             for length in lengths]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return TokenizedCells(np.concatenate(cells).astype(np.int32), offsets, 0)


def build_model(scale: Scale, checkpointing: bool) -> TrainedClassifier:
    token = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{f"G{i}": i for i in range(4, scale.vocab)}}
    dictionaries = GeneDictionaries(token=token, median=dict.fromkeys(list(token)[4:], 1.0))
    bert = new_bert(Vocabulary(scale.vocab, 0, scale.input_size), num_hidden_layers=scale.layers,
                    hidden_size=scale.hidden, num_attention_heads=scale.heads, intermediate_size=scale.ffn,
                    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    module = CellClassifier(bert_config=bert.config.to_dict(), class_names=["Normal", "Border", "Tumor"],
                            special_token_ids={"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3},
                            tokenizer={"model_version": "V2", "input_size": scale.input_size}, pooling="cls",
                            bert=bert, gradient_checkpointing=checkpointing, donors=["d"], train_donors=["d"])
    settings = TokenizerSettings(model_version="V2", input_size=scale.input_size)
    return TrainedClassifier(module, dictionaries, settings, {"check": "random weights"})


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: str) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device == "cuda" else "-"


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(run, count: int, seconds: float, device: str) -> tuple[int, float]:
    """``run(i)`` for i = 0, 1, ... (the first untimed, a warm-up) until ``count`` runs or ``seconds``; (units done,
    seconds taken) of the timed runs, ``run`` returning its units."""
    run(0)
    synchronize(device)
    started, done, i = time.perf_counter(), 0, 1
    while i <= count and (time.perf_counter() - started) < seconds:
        done += run(i)
        i += 1
    synchronize(device)
    return done, time.perf_counter() - started


def training(scale: Scale, cells: TokenizedCells, budget: int, checkpointing: bool, device: str) -> str:
    model = build_model(scale, checkpointing)
    module = model.module.to(device).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=5e-5, fused=device == "cuda")
    sampler = TrainBatchSampler(labels=np.arange(len(cells)) % 3, donors=np.zeros(len(cells)), lengths=cells.lengths,
                                batch_size=12, max_tokens=budget)
    batches = sampler.epoch_batches(0)
    per_batch = len(cells) / len(batches)
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    reset_peak(device)

    def step(i: int) -> int:
        rows = batches[i % len(batches)]
        items = [{"tokens": cells.cell_tokens(int(row)), "label": int(row) % 3, "index": int(row), "donor": 0}
                 for row in rows]
        batch = {key: value.to(device, non_blocking=True) for key, value in pad_batch(items, 0, per_batch).items()}
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = module.training_step(batch, i)
        loss.backward()
        optimizer.step()
        return len(rows)

    done, seconds = timed(step, scale.steps, scale.seconds, device)
    checkpointing_said = "on" if checkpointing else "off"
    return (f"train V2-104M, max_tokens {budget} ({budget // scale.input_size} full cells), checkpointing "
            f"{checkpointing_said}: {done / seconds:.1f} cells/s, peak {peak_gib(device)} GiB")


def inference(scale: Scale, cells: TokenizedCells, device: str) -> list[str]:
    model = build_model(scale, checkpointing=False)
    lines = []
    reset_peak(device)
    budget = 64 * scale.input_size
    done, seconds = timed(lambda i: len(model.apply(cells, max_tokens=budget, device=device)[0]), 1,
                          scale.seconds, device)
    lines.append(f"predict (max_tokens {budget}): {done / seconds:.1f} cells/s, peak {peak_gib(device)} GiB")

    chosen = np.arange(min(8, len(cells)))
    reset_peak(device)

    def deletions(i: int) -> int:
        made = 0
        for row in chosen:
            tokens = np.asarray(cells.cell_tokens(int(row)), dtype=np.int64)
            variants = [np.delete(tokens, position) for position in range(1, 1 + scale.genes_perturbed)]
            for start in range(0, len(variants), max(1, budget // len(tokens))):
                part = variants[start : start + max(1, budget // len(tokens))]
                model.infer(*pad_tokens(part, 0), device)
                made += len(part)
        return made

    done, seconds = timed(deletions, 1, scale.seconds, device)
    lines.append(f"perturb (single-gene deletions of {len(chosen)} cells): {done / seconds:.1f} perturbations/s, "
                 f"peak {peak_gib(device)} GiB")

    explained = CellSet(cells, np.arange(scale.explained), pd.DataFrame(index=np.arange(scale.explained)))
    targets = np.zeros(scale.explained, dtype=np.int64)
    reset_peak(device)
    ig_budget = 16 * scale.input_size
    done, seconds = timed(lambda i: len(integrated_gradients(model, explained, targets, scale.ig_steps, "pad", 16,
                                                             device, ig_budget)[1]), 1, scale.seconds, device)
    lines.append(f"explain (integrated gradients, {scale.ig_steps} steps, max_tokens {ig_budget}): "
                 f"{done / seconds:.2f} cells/s, peak {peak_gib(device)} GiB")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (seconds)")
    args = parser.parse_args()
    quiet_libraries()
    started = time.perf_counter()
    scale = SMOKE if args.smoke else FULL
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        print("no GPU here: the check measures nothing on the CPU at V2's shape; run it with --smoke, or on a GPU")
        raise SystemExit(2)
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke: tiny shapes)"
    print(f"GPU check on {name}, torch {torch.__version__}, V2-104M shape "
          f"({scale.layers} x {scale.hidden}, input {scale.input_size}), random weights", flush=True)
    cells = synthetic_cells(scale)
    for budget in scale.budgets:
        for checkpointing in (False, True):
            try:
                print(training(scale, cells, budget, checkpointing, device), flush=True)
            except torch.cuda.OutOfMemoryError:
                print(f"train V2-104M, max_tokens {budget}, checkpointing {'on' if checkpointing else 'off'}: out of "
                      "GPU memory", flush=True)
    for line in inference(scale, cells, device):
        print(line, flush=True)
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
