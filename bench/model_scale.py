"""Benchmark: Geneformer's real shapes on the CPU, random weights: what a training step and the inference verbs cost.

    python bench/model_scale.py [--small] [--steps 1] [--threads 1] [--markdown FILE]

Each case runs in a fresh process (its peak resident memory is its own; with ``--small`` all in this one), one torch
thread by default:

- a training step (forward, backward, AdamW step) of the ``CellClassifier`` at V1-10M's shape (6 x 256, input
  2,048, batch 4) and V2-104M's (12 x 768, input 4,096, batch 2), a batch whose second cell is three quarters of
  the first (so there is padding), with the padding handed to the encoder as transformers' own 2-D mask or as this
  project's (batch, 1, 1, L) one, with and without activation checkpointing: seconds a step (after one warm-up
  step) and the peak resident memory above the model's and its optimizer state's;
- inference at V2-104M's shape: ``predict``'s forward (``CellClassifier.infer`` under inference mode) in cells/s
  and peak memory, and ``explain``'s integrated gradients (captum's ``LayerIntegratedGradients`` on the token
  embeddings, as ``jobs/explain.py``) in cells/s at 2 integration steps (``explain`` defaults to 32: its cost
  grows with the steps);
- checkpoint bytes at V2-104M's and V1-10M's shapes: a best.ckpt with the AdamW state (before) and with the
  weights only (after), and what a ``cv=lodo`` of 6 donors x 3 seeds keeps (before: best and last a fold; after:
  best only).

``--small``: tiny shapes, for the test that the script runs (seconds). ``--v2-layers N``: V2-104M's compute cases with
its first N layers only (its width, heads, input size and batch unchanged): on a small CPU a full 12-layer step of
two 4,096-token cells takes tens of minutes and more memory than the machine has; the cost a layer is what N layers
cost over N (the embeddings and head aside), and the table says which was run.
"""

from __future__ import annotations

import sys

# bench/tokenize.py shadows the standard library's `tokenize`: take this folder off the module path first.
sys.path = [entry for entry in sys.path if entry not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

# name: layers, hidden, heads, FFN, vocabulary, input size, batch, framing (V2's <cls>/<eos>)
SHAPES = {
    "V1-10M": (6, 256, 4, 512, 25_426, 2048, 4, False),
    "V2-104M": (12, 768, 12, 3072, 20_275, 4096, 2, True),
}
SMALL_SHAPES = {
    "V1-10M": (2, 32, 2, 64, 300, 64, 4, False),
    "V2-104M": (2, 48, 4, 96, 300, 128, 2, True),
}
CV_CHECKPOINTS = 6 * 3  # a cv=lodo of the six KUL3 donors, 3 seeds


def resident_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(shape: tuple, checkpointing: bool = False, layers: int | None = None):
    """A CellClassifier of ``shape`` (its first ``layers`` layers: None, all) with random weights and a padded batch of
    its size (ids, mask, labels)."""
    import torch

    from geneformer_colon.model.backbone import Vocabulary, new_bert
    from geneformer_colon.model.module import CellClassifier

    all_layers, hidden, heads, ffn, vocab, length, batch, framed = shape
    layers = layers or all_layers
    bert = new_bert(Vocabulary(vocab, 0, length), num_hidden_layers=layers, hidden_size=hidden,
                    num_attention_heads=heads, intermediate_size=ffn, hidden_dropout_prob=0.1 if framed else 0.02)
    specials = {"<pad>": 0, "<mask>": 1, **({"<cls>": 2, "<eos>": 3} if framed else {})}
    module = CellClassifier(bert_config=bert.config.to_dict(), class_names=["Normal", "Border", "Tumor"],
                            special_token_ids=specials, pooling="cls" if framed else "mean", bert=bert,
                            gradient_checkpointing=checkpointing, donors=["d"], train_donors=["d"])
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):  # the other cells three quarters as long: padding in the batch
        attention_mask[row, length * 3 // 4:] = 0
        input_ids[row, length * 3 // 4:] = 0
    if framed:
        input_ids[:, 0] = 2
        input_ids[torch.arange(batch), attention_mask.sum(1) - 1] = 3
    labels = torch.arange(batch) % 3
    return module, input_ids, attention_mask, labels


def two_d_mask(module) -> None:
    """The encoder handed transformers' own 2-D mask (which it expands to (batch, 1, L, L))."""
    module.encoder.encoder_mask = lambda mask: mask


def train_case(shape: tuple, mask: str, checkpointing: bool, steps: int, layers: int | None) -> dict:
    import torch

    module, input_ids, attention_mask, labels = build(shape, checkpointing, layers)
    if mask == "2-D":
        two_d_mask(module)
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "donors": torch.zeros(len(labels), dtype=torch.long), "index": torch.arange(len(labels))}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module.training_step(batch, 0).backward()
        optimizer.step()

    step()  # warm-up: AdamW's state is made here
    optimizer.zero_grad(set_to_none=True)
    resident = resident_bytes()  # weights, AdamW state (gradients freed)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {"seconds_per_step": min(times), "peak_gib": peak_bytes() / 2**30,
            "step_gib": max(0, peak_bytes() - resident) / 2**30, "tokens": int(input_ids.numel())}


def predict_case(shape: tuple, steps: int, layers: int | None) -> dict:
    import torch

    module, input_ids, attention_mask, _ = build(shape, layers=layers)
    module.eval()
    resident = resident_bytes()
    with torch.inference_mode():
        module.infer(input_ids, attention_mask)
        started = time.perf_counter()
        for _ in range(steps):
            module.infer(input_ids, attention_mask)
        seconds = (time.perf_counter() - started) / steps
    return {"cells_per_second": len(input_ids) / seconds, "peak_gib": peak_bytes() / 2**30,
            "step_gib": max(0, peak_bytes() - resident) / 2**30}


def explain_case(shape: tuple, integration_steps: int, layers: int | None) -> dict:
    import torch
    from captum.attr import LayerIntegratedGradients

    from geneformer_colon.jobs.explain import baseline_ids

    module, input_ids, attention_mask, _ = build(shape, layers=layers)
    module.eval()
    method = LayerIntegratedGradients(lambda ids, mask: module.infer(ids, mask).logits,
                                      module.encoder.bert.embeddings.word_embeddings)
    base = baseline_ids(input_ids, attention_mask, 0, framed=shape[-1])
    target = torch.zeros(len(input_ids), dtype=torch.long)
    resident = resident_bytes()
    started = time.perf_counter()
    method.attribute(input_ids, baselines=base, additional_forward_args=(attention_mask,), target=target,
                     n_steps=integration_steps, internal_batch_size=len(input_ids))
    seconds = time.perf_counter() - started
    return {"cells_per_second": len(input_ids) / seconds, "steps": integration_steps,
            "peak_gib": peak_bytes() / 2**30, "step_gib": max(0, peak_bytes() - resident) / 2**30}


def checkpoint_case(shape: tuple) -> dict:
    """Bytes of a best.ckpt as Lightning writes it, with the AdamW state (before) and without (after)."""
    import torch

    module, input_ids, attention_mask, labels = build(shape)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    for parameter in module.parameters():  # AdamW's state as after a step, without computing one
        optimizer.state[parameter] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(parameter),
                                      "exp_avg_sq": torch.zeros_like(parameter)}

    def size(checkpoint: dict) -> int:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        return buffer.tell()

    weights = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch_history": []}
    full = {**weights, "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [{}], "callbacks": {}}
    before, after = size(full), size(weights)
    return {"best_before": before, "best_after": after, "cv_before": 2 * CV_CHECKPOINTS * before,
            "cv_after": CV_CHECKPOINTS * after}


def run_case(case: dict) -> dict:
    import torch

    torch.set_num_threads(case["threads"])
    shapes = SMALL_SHAPES if case["small"] else SHAPES
    shape = shapes[case["shape"]]
    layers = case.get("layers")
    if case["kind"] == "train":
        return train_case(shape, case["mask"], case["checkpointing"], case["steps"], layers)
    if case["kind"] == "predict":
        return predict_case(shape, case["steps"], layers)
    if case["kind"] == "explain":
        return explain_case(shape, 2, layers)
    return checkpoint_case(shape)


def cases(steps: int, threads: int, small: bool, v2_layers: int | None) -> list[dict]:
    common = {"steps": steps, "threads": threads, "small": small}
    layers = {"V1-10M": None, "V2-104M": v2_layers}
    made = [{"kind": "train", "shape": shape, "mask": mask, "checkpointing": checkpointing, "layers": layers[shape],
             **common} for shape in SHAPES for checkpointing in (False, True) for mask in ("2-D", "4-D")]
    made += [{"kind": kind, "shape": "V2-104M", "layers": v2_layers, **common} for kind in ("predict", "explain")]
    made += [{"kind": "checkpoint", "shape": shape, **common} for shape in SHAPES]
    return made


def in_a_process(case: dict) -> dict:
    """One case in a fresh interpreter: its peak memory is its own."""
    result = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["exit %d" % result.returncode])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[tuple[dict, dict]], small: bool) -> str:
    shapes = SMALL_SHAPES if small else SHAPES
    lines = ["| case | shape (layers x hidden, input, batch) | figure | peak RSS GiB | above weights + state GiB |",
             "|---|---|---|---|---|"]
    for case, result in rows:
        layers, hidden, _, _, _, length, batch, _ = shapes[case["shape"]]
        measured = f"{case['layers']} of {layers}" if case.get("layers") and case["kind"] != "checkpoint" else layers
        where = f"{case['shape']} ({measured} x {hidden}, {length}, {batch})"
        if "error" in result:
            lines.append(f"| {case['kind']} | {where} | failed: {result['error'][:80]} | | |")
            continue
        if case["kind"] == "train":
            name = f"training step, {case['mask']} mask, checkpointing {'on' if case['checkpointing'] else 'off'}"
            figure = f"{result['seconds_per_step']:.2f} s/step"
        elif case["kind"] == "predict":
            name, figure = "predict (forward, inference mode)", f"{result['cells_per_second']:.3f} cells/s"
        elif case["kind"] == "explain":
            name = f"explain (integrated gradients, {result['steps']} steps)"
            figure = f"{result['cells_per_second']:.3f} cells/s"
        else:
            mib = 2**20
            lines.append(f"| best.ckpt with AdamW state -> weights only | {where} | {result['best_before'] / mib:.1f} "
                         f"-> {result['best_after'] / mib:.1f} MiB; cv=lodo 6 donors x 3 seeds: "
                         f"{result['cv_before'] / 2**30:.2f} -> {result['cv_after'] / 2**30:.2f} GiB | | |")
            continue
        lines.append(f"| {name} | {where} | {figure} | {result['peak_gib']:.2f} | {result['step_gib']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (seconds): the test's setting")
    parser.add_argument("--steps", type=int, default=1, help="timed steps a case, after one warm-up (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--v2-layers", type=int, help="V2-104M's training, predict and explain cases with only its "
                                                      "first N of 12 layers (a step's time and activation memory grow "
                                                      "with the layers; default: all 12)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    started = time.perf_counter()
    rows = []
    for case in cases(args.steps, args.threads, args.small, args.v2_layers):
        rows.append((case, run_case(case) if args.small else in_a_process(case)))
        print(f"{case['kind']} {case['shape']} {case.get('mask', '')} "
              f"{'checkpointing' if case.get('checkpointing') else ''}: {rows[-1][1]}", flush=True)
    text = table(rows, args.small)
    print(text)
    print(f"wall time {time.perf_counter() - started:.0f} s, {args.threads} torch thread(s) a case")
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
