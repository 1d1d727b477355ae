"""A baseline (``baseline=naive_bayes|logreg|pca_knn``, :mod:`geneformer_colon.model.baselines`) on normalised
counts, written as a run directory.

The cells, labels and donor split are the training datamodule's own (its filters, its split,
its class checks), so the baseline and the network are scored on exactly the same cells. The
features are each cell's counts over all genes of the canonical AnnData, scaled to
``target_sum`` counts (``count / n_counts * target_sum``, ``n_counts`` being the cell's total
over all genes) and, with ``log1p``, log-transformed. The classifier is fitted on the training
donors' cells alone. Metrics come from the same :class:`ClassificationMetrics` as training (through
:func:`geneformer_colon.assembly.scoring.score_split`); ``loss`` is the mean negative log-likelihood of the
true class.
"""

from __future__ import annotations

import logging
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from sklearn.pipeline import Pipeline

from geneformer_colon.assembly.builders import build_datamodule
from geneformer_colon.assembly.scoring import score_split
from geneformer_colon.common.names import EVAL_SPLITS, FINISHED, SPLITS
from geneformer_colon.data.datamodule import CellDataModule
from geneformer_colon.model.baselines import check_fits
from geneformer_colon.report.history import write_history
from geneformer_colon.report.summary import print_summary
from geneformer_colon.report.wandb_run import log_finished_run
from geneformer_colon.runs.config import check_values
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.reading import Run
from geneformer_colon.runs.record import check_success, run_record, write_metrics
from geneformer_colon.runs.start import accept_start, prepare_run_dir, recipe

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


def predicted(model: Pipeline, features: sp.csr_matrix, targets: np.ndarray) -> tuple[np.ndarray, float]:
    """A split's class probabilities and the mean negative log-likelihood of its true classes (a probability
    of 0, a kNN vote none of the neighbours cast, counts as 1e-12)."""
    if hasattr(model, "predict_log_proba"):
        log_probabilities = model.predict_log_proba(features)
        probabilities = np.exp(log_probabilities)
    else:
        probabilities = model.predict_proba(features)
        log_probabilities = np.log(np.clip(probabilities, 1e-12, 1.0))
    return probabilities, float(-log_probabilities[np.arange(len(targets)), targets].mean())


# The keys of a baseline option that make its features, not its classifier.
FEATURE_KEYS = ("name", "target_sum", "log1p")


def build_baseline(settings: DictConfig) -> Pipeline:
    """The classifier the ``baseline`` option names, with its own keys."""
    return instantiate({key: value for key, value in OmegaConf.to_container(settings, resolve=True).items()
                        if key not in FEATURE_KEYS})


# The nodes of the train config a baseline does not use (the network's); of ``model`` it keeps the tokenizer,
# whose dictionaries choose the genes and the cells.
NETWORK_NODES = ("optimizer", "scheduler", "loss", "augment", "robust", "trainer", "callbacks", "init_from")


def baseline_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` less the network's nodes, so a baseline's config.yaml (and W&B config) holds only what it used."""
    with open_dict(cfg):
        for node in NETWORK_NODES:
            cfg.pop(node, None)
        cfg.model = {"tokenizer": cfg.model.tokenizer}
    return cfg


def run_baseline(cfg: DictConfig) -> dict[str, Any]:
    """Fit on the training donors, score val and test, write the run directory; return its metrics.json record."""
    layout = RunLayout(cfg.paths.run_dir)
    check_values(cfg)
    datamodule = build_datamodule(cfg)
    targets = {split: datamodule.splits[split].label_ids.astype(np.int64) for split in SPLITS}
    class_names = datamodule.class_names
    model = build_baseline(cfg.baseline)
    adata = datamodule.cells.to_anndata()
    check_fits(model, len(targets["train"]), adata.n_vars, len(np.unique(targets["train"])))
    prepare_run_dir(layout, overwrite=cfg.overwrite)
    accept_start(layout, cfg)
    features = split_features(datamodule, adata, cfg.baseline)
    model.fit(features["train"], targets["train"])
    log.info("%s fitted on %d training cells x %d genes", cfg.baseline.name, *features["train"].shape)

    final: dict[str, Any] = {}
    for split in EVAL_SPLITS:
        probabilities, loss = predicted(model, features[split], targets[split])
        final[split] = score_split(layout, split, datamodule.split_cells(split), targets[split], probabilities,
                                   class_names, cfg.run_name, loss=loss)
    record = run_record(cfg.run_name, "baseline", FINISHED, {split: datamodule.split_donors(split) for split in SPLITS},
                        {split: len(datamodule.splits[split]) for split in SPLITS}, final=final,
                        success=check_success(cfg.success_criteria, final), recipe=recipe(),
                        data=datamodule.source.provenance())
    record = write_metrics(layout, record)
    write_history(Run(layout.root, record, OmegaConf.to_container(cfg, resolve=True), {}))
    # beside a sweep's runs, same metric names; its config only the keys it used, however it was called
    log_finished_run(baseline_config(cfg), layout, "baseline", record, class_names)
    print_summary(record, class_names, layout.root)
    return record
