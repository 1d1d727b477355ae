"""Gene attributions by integrated gradients: ``geneformer-colon explain RUN_DIR|EXPORT_DIR [INPUT.h5ad]``.

For each chosen cell, the logit of its predicted class (or ``--target``) is attributed to its
tokens with captum's ``LayerIntegratedGradients`` on the token embeddings: the path runs from a
baseline in which every gene token is replaced by ``<pad>`` (or ``<mask>``, ``--baseline``) to the
cell, in ``--steps`` steps, at the same positions and with the same attention mask; ``<cls>`` and
``<eos>`` stay as they are (their attribution is zero). A gene's attribution is the sum over the
embedding dimensions at its position. Completeness: the attributions of a cell sum to its logit
minus the baseline's logit, up to the integration error captum reports as the convergence delta;
its size is written to ``completeness.json``.

The per-gene statistics and files are ``perturb``'s (:mod:`geneformer_colon.report.gene_effects`): genes.csv,
genes.md, ``attributions.h5ad`` (cells x genes) and plots, the means also per donor, per true class
(``label_``), per cell type and per explained class (``explained_``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from captum.attr import LayerIntegratedGradients

from geneformer_colon.assembly.batching import DEFAULT_EXPLAIN_CELLS, token_budget
from geneformer_colon.assembly.trained_classifier import FoldEnsemble, TrainedClassifier, bf16_autocast
from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import write_json
from geneformer_colon.common.output_folder import output_folder
from geneformer_colon.data.dictionaries import FRAME_TOKENS
from geneformer_colon.data.samplers import EvalBatchSampler
from geneformer_colon.jobs.cell_choice import CellSet, check_cell_counts, select_cells
from geneformer_colon.jobs.perturb import Columns, choose_columns, default_name, default_out, fold_path
from geneformer_colon.jobs.predict import GeneIds
from geneformer_colon.report.gene_effects import GENE_OUTPUTS, GeneEffects, write_gene_outputs

log = logging.getLogger(__name__)

BASELINES = {"pad": "<pad>", "mask": "<mask>"}


def baseline_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, baseline_token: int, framed: bool
                 ) -> torch.Tensor:
    """The input with every gene token replaced by ``baseline_token`` (padding and ``<cls>``/``<eos>`` kept)."""
    genes = attention_mask.bool().clone()
    if framed:
        genes[:, 0] = False
        genes[torch.arange(len(genes)), attention_mask.sum(1) - 1] = False
    return torch.where(genes, torch.full_like(input_ids, baseline_token), input_ids)


def integrated_gradients(model: TrainedClassifier, cells: CellSet, targets: np.ndarray, steps: int, baseline: str,
                         batch_size: int, device: str, max_tokens: int | None = None
                         ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Each cell's per-token attributions (its tokens' order), the convergence deltas and the logit differences.
    Cells go ``batch_size`` at a time, or as many as fit ``max_tokens`` padded tokens (then each forward pass of
    the integration holds that many tokens too); bf16 autocast on a GPU that has it; a batch halved on a GPU's
    out-of-memory (the verbs' one :class:`~geneformer_colon.assembly.batching.OomHalving`)."""
    module = model.module.to(device).eval()
    framed = bool(FRAME_TOKENS[model.settings.model_version])
    token = model.dictionaries.token[BASELINES[baseline]]

    def logits(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return module.infer(input_ids, attention_mask).logits

    method = LayerIntegratedGradients(logits, module.encoder.bert.embeddings.word_embeddings)
    attributions: list[np.ndarray] = [np.zeros(0)] * len(cells.rows)
    deltas, differences = np.zeros(len(cells.rows)), np.zeros(len(cells.rows))
    lengths = cells.tokens.lengths[cells.rows]
    device_type = torch.device(device).type
    bf16 = bf16_autocast(device)
    for batch in EvalBatchSampler(lengths, batch_size, max_tokens=max_tokens):
        all_ids, all_masks = cells.tokens.padded(cells.rows[batch], model.pad_id)
        internal = batch_size if max_tokens is None else max(1, max_tokens // all_ids.shape[1])

        def attribute(part: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            input_ids, attention_mask = all_ids[part].to(device), all_masks[part].to(device)
            base = baseline_ids(input_ids, attention_mask, token, framed)
            target = torch.as_tensor(targets[batch][part], device=device)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                attribution, delta = method.attribute(input_ids, baselines=base, n_steps=steps, target=target,
                                                      additional_forward_args=(attention_mask,),
                                                      internal_batch_size=internal, return_convergence_delta=True)
                with torch.inference_mode():
                    rows = torch.arange(len(target), device=device)
                    difference = (logits(input_ids, attention_mask)[rows, target]
                                  - logits(base, attention_mask)[rows, target])
            return (attribution.sum(-1).detach().float().cpu().numpy(), delta.detach().float().cpu().numpy(),
                    difference.float().cpu().numpy())

        per_token, delta, difference = (np.concatenate(column) for column in zip(*model.oom(attribute, len(batch))))
        for i, cell in enumerate(batch):
            attributions[cell] = per_token[i, : lengths[cell]]
        deltas[batch] = delta
        differences[batch] = difference
    return attributions, deltas, differences


def attribution_effects(model: TrainedClassifier, cells: CellSet, columns: Columns, attributions: list[np.ndarray],
                        framed: bool) -> GeneEffects:
    """Each cell's attributions to the genes of ``columns`` (found by token position), as gene effects."""
    head = 1 if framed else 0
    column_of = np.full(len(model.dictionaries.token), -1, dtype=np.int64)
    column_of[columns.single_tokens] = columns.single
    cell_parts, column_parts, rank_parts, value_parts = [], [], [], []
    for index, (row, attribution) in enumerate(zip(cells.rows, attributions)):
        tokens = np.asarray(cells.tokens.cell_tokens(int(row)), dtype=np.int64)
        genes_here = tokens[head : len(tokens) - head]
        column = column_of[genes_here]
        kept = np.flatnonzero(column >= 0)
        cell_parts.append(np.full(len(kept), index))
        column_parts.append(column[kept])
        rank_parts.append(kept / len(genes_here))
        value_parts.append(attribution[head : len(tokens) - head][kept])
    return GeneEffects(names=columns.names, symbols=columns.symbols, cell=np.concatenate(cell_parts),
                       column=np.concatenate(column_parts), rank=np.concatenate(rank_parts).astype(np.float32),
                       values={"attribution": np.concatenate(value_parts).astype(np.float32)})


def explain(model_path: str | Path, input_path: str | Path | None = None, target: str | None = None,
            where: Sequence[str] = (), genes: str | None = "all", min_cells: int = 10, max_cells: int | None = None,
            seed: int = 0, steps: int = 32, baseline: str = "pad", out_dir: str | Path | None = None,
            name: str | None = None, gene_ids: GeneIds = GeneIds(), layer: str | None = None,
            batch_size: int | None = None, device: str = "cpu", fold: str | None = None, max_tokens: int | None = None
            ) -> tuple[Path, dict[str, Any]]:
    """Attribute the chosen cells' predicted (or ``target``) class to their genes; write the gene files and
    completeness.json; return the folder and the completeness figures. A CV run: its ``fold``. Batches:
    ``batch_size`` cells, or ``max_tokens`` padded tokens (default :data:`DEFAULT_EXPLAIN_CELLS` cells of the
    model's input size)."""
    model = TrainedClassifier.load(model_path, fold)
    if isinstance(model, FoldEnsemble):  # gradients of one network: an ensemble has several
        raise InputError(f"{model_path}: a cross-validated run; explain one of its folds with --fold DONOR (one of "
                         f"{', '.join(model.origin['folds'])})")
    model_path = fold_path(model_path, fold)
    if target is not None and target not in model.class_names:
        raise InputError(f"--target {target}: not a class of the model {model.class_names}; choose one of those")
    if baseline not in BASELINES:
        raise InputError(f"--baseline {baseline}: unknown; use one of {', '.join(BASELINES)}")
    if steps < 2:
        raise InputError(f"--steps {steps}: integrated gradients needs 2 steps or more")
    check_cell_counts(max_cells, min_cells)
    batch_size, max_tokens = token_budget(batch_size, max_tokens, model.settings.resolved_input_size,
                                          DEFAULT_EXPLAIN_CELLS)
    what = target or "predicted class"
    out = Path(out_dir) if out_dir is not None else default_out(model_path, input_path, "explain") / (
        name or default_name(f"ig_{what}", where))
    with output_folder(out, "explain", (*GENE_OUTPUTS, "attributions.h5ad", "completeness.json")) as written:
        choice = select_cells(model, model_path, input_path, where, max_cells, seed, gene_ids, layer)
        cells = choice.cells
        framed = bool(FRAME_TOKENS[model.settings.model_version])
        columns = choose_columns(choice.names, cells, genes or "all", (), min_cells, framed)
        started = time.perf_counter()
        probabilities, _ = model.apply(cells.tokens, cells.rows, batch_size, max_tokens, device=device)
        predicted = probabilities.argmax(1)
        targets = predicted if target is None else np.full(len(predicted), model.class_names.index(target))
        attributions, deltas, differences = integrated_gradients(model, cells, targets, steps, baseline, batch_size,
                                                                 device, max_tokens)
        seconds = time.perf_counter() - started
        classes = np.asarray(model.class_names)
        obs = cells.obs.assign(predicted=classes[predicted], explained=classes[targets])
        effects = attribution_effects(model, cells, columns, attributions, framed)
        mean_abs_delta, mean_abs_difference = float(np.mean(np.abs(deltas))), float(np.mean(np.abs(differences)))
        completeness = {"cells": len(cells.rows), "steps": steps, "baseline": BASELINES[baseline],
                        "mean_abs_delta": mean_abs_delta, "max_abs_delta": float(np.max(np.abs(deltas))),
                        "mean_abs_logit_difference": mean_abs_difference,
                        "relative_mean_abs_delta": mean_abs_delta / max(mean_abs_difference, 1e-12)}
        settings = {"command": "explain", "model": str(model_path), "input": str(input_path or "run val/test cells"),
                    "target": what, "where": list(where), "genes": genes or "all", "min_cells": min_cells,
                    "max_cells": max_cells, "seed": seed, "steps": steps, "baseline": BASELINES[baseline],
                    "cells": len(cells.rows), "columns": len(columns), "seconds": round(seconds, 2), "device": device,
                    "max_tokens": max_tokens}
        write_gene_outputs(written, effects, obs, settings, matrix_name="attributions.h5ad",
                           title=f"integrated gradients of the {what} logit", groups=("donor", "label", "cell_type",
                                                                                       "explained"))
        write_json(written / "completeness.json", completeness)
    log.info("attributions of %d cells x %d genes in %.1f s; completeness: mean |delta| %.3g of mean |logit "
             "difference| %.3g: %s", len(cells.rows), len(columns), seconds, completeness["mean_abs_delta"],
             completeness["mean_abs_logit_difference"], out)
    return out, completeness
