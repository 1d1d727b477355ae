"""The Naive Bayes baseline: multinomial naive Bayes on normalised counts, written as a run directory.

The cells, labels and donor split are the training datamodule's own (its filters, its split,
its class checks), so the baseline and the network are scored on exactly the same cells. The
features are each cell's counts over all genes of the canonical AnnData, scaled to
``target_sum`` counts (``count / n_counts * target_sum``, ``n_counts`` being the cell's total
over all genes) and, with ``log1p``, log-transformed. Metrics come from the same
:class:`ClassificationMetrics` as training; ``loss`` is the mean negative log-likelihood of the
true class.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from omegaconf import DictConfig
from sklearn.naive_bayes import MultinomialNB

from geneformer_colon.builders import build_datamodule
from geneformer_colon.data.datamodule import SPLITS, CellDataModule
from geneformer_colon.io import write_json
from geneformer_colon.report.artifacts import write_split_files
from geneformer_colon.report.history import write_history
from geneformer_colon.report.metrics import ClassificationMetrics
from geneformer_colon.report.summary import check_success, print_summary
from geneformer_colon.training import prepare_run_dir, save_config

log = logging.getLogger(__name__)


def normalised_counts(adata: ad.AnnData, cell_ids: np.ndarray, target_sum: float, log1p: bool) -> sp.csr_matrix:
    """Counts of the given cells scaled to ``target_sum`` per cell (then log1p), as float64 CSR."""
    rows = adata.obs_names.get_indexer(cell_ids)
    counts = sp.csr_matrix(adata.X[rows], dtype=np.float64)
    totals = adata.obs["n_counts"].to_numpy(dtype=np.float64)[rows]
    scaled = sp.diags(target_sum / np.maximum(totals, 1.0)) @ counts
    return scaled.log1p() if log1p else scaled


def split_features(datamodule: CellDataModule, adata: ad.AnnData, settings: DictConfig) -> dict[str, sp.csr_matrix]:
    return {
        split: normalised_counts(adata, datamodule.split_cells(split)["cell_id"].to_numpy(),
                                 settings.target_sum, settings.log1p)
        for split in SPLITS
    }


def score_split(
    model: MultinomialNB, features: sp.csr_matrix, targets: np.ndarray, class_names: list[str]
) -> tuple[np.ndarray, dict[str, Any]]:
    """Class probabilities and the training metrics (same keys, same code) of one split."""
    log_probabilities = model.predict_log_proba(features)
    probabilities = np.exp(log_probabilities)
    loss = -log_probabilities[np.arange(len(targets)), targets].mean()
    metrics = ClassificationMetrics(class_names)
    metrics.update(torch.from_numpy(probabilities), torch.from_numpy(targets), torch.tensor(loss))
    return probabilities, {**metrics.compute(), "confusion_matrix": metrics.confusion_matrix()}


def run_baseline(cfg: DictConfig) -> float:
    """Fit on the training donors, score val and test, write the run directory; return val macro F1."""
    run_dir = Path(cfg.paths.run_dir)
    prepare_run_dir(run_dir, resume=False, overwrite=cfg.overwrite)
    datamodule = build_datamodule(cfg)
    save_config(cfg, run_dir)
    adata = datamodule.read_adata()
    features = split_features(datamodule, adata, cfg.baseline)
    targets = {split: datamodule.splits[split].label_ids.astype(np.int64) for split in SPLITS}
    class_names = datamodule.class_names
    model = MultinomialNB(alpha=cfg.baseline.alpha, fit_prior=cfg.baseline.fit_prior)
    model.fit(features["train"], targets["train"])
    log.info("naive Bayes fitted on %d training cells x %d genes", *features["train"].shape)

    final: dict[str, Any] = {}
    for split in ("val", "test"):
        probabilities, final[split] = score_split(model, features[split], targets[split], class_names)
        write_split_files(run_dir, split, datamodule.split_cells(split), targets[split], probabilities,
                          final[split]["confusion_matrix"], class_names, f"{cfg.run_name} {split}")
    summary = {
        "run_name": cfg.run_name,
        "status": "finished",
        "epochs": [],
        "best_epoch": None,
        "best_checkpoint": None,
        "init_from": None,
        **final,
        "success": check_success(cfg.success_criteria, final),
    }
    write_json(run_dir / "metrics.json", summary)
    write_history(run_dir)
    print_summary(summary, class_names, run_dir)
    return final["val"]["macro_f1"]
