"""A baseline (``baseline=naive_bayes|logreg|pca_knn|scanvi|frozen_probe``, :mod:`geneformer_colon.model.baselines`)
written as a run directory.

The cells, labels and donor split are the training datamodule's own (its filters, its split,
its class checks), so the baseline and the network are scored on exactly the same cells. The
features are each cell's counts over all genes of the canonical AnnData, scaled to
``target_sum`` counts (``count / n_counts * target_sum``, ``n_counts`` being the cell's total
over all genes) and, with ``log1p``, log-transformed (``target_sum: null``: the raw counts, as scANVI
reads them). ``features: embedding`` (``frozen_probe``) gives each cell's pooled embedding from the run's
encoder (``model``, and ``init_from``: a run's best weights) instead, frozen, computed once through
:meth:`TrainedClassifier.apply`, the inference path of ``geneformer-colon embed`` and ``predict``. The
classifier is fitted on the training donors' cells alone (scANVI also gets every cell's donor, and the
held-out cells without their labels: :class:`~geneformer_colon.model.baselines.Scanvi`). Metrics come from
the same :class:`ClassificationMetrics` as training (through
:func:`geneformer_colon.assembly.scoring.score_split`); ``loss`` is the mean negative log-likelihood of the
true class. ``calibration`` is fitted on the validation cells' probabilities as training fits it
(``calibration.json``): the calibrated, abstention and conformal figures of a baseline and the network compare.
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

from geneformer_colon.assembly.builders import build_datamodule, load_weights, vocabulary_of
from geneformer_colon.assembly.scoring import score_split
from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.assembly.trust import RunTrust, sample_rows, trust_settings
from geneformer_colon.common.names import EVAL_SPLITS, FINISHED, SPLITS, TRAIN, VAL
from geneformer_colon.data.datamodule import CellDataModule
from geneformer_colon.jobs.train import check_run_calibration
from geneformer_colon.model.baselines import check_fits
from geneformer_colon.model.module import CellClassifier
from geneformer_colon.report.history import write_history
from geneformer_colon.report.summary import print_summary
from geneformer_colon.report.wandb_run import log_finished_run
from geneformer_colon.runs.config import check_values
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.reading import Run
from geneformer_colon.runs.record import check_success, run_record, write_metrics
from geneformer_colon.runs.start import accept_start, prepare_run_dir, recipe

log = logging.getLogger(__name__)


def normalised_counts(adata: ad.AnnData, cell_ids: np.ndarray, target_sum: float | None, log1p: bool
                      ) -> sp.csr_matrix:
    """Counts of the given cells scaled to ``target_sum`` per cell (None: not scaled) then log1p, as float64 CSR."""
    rows = adata.obs_names.get_indexer(cell_ids)
    counts = sp.csr_matrix(adata.X[rows], dtype=np.float64)
    if target_sum is not None:
        totals = adata.obs["n_counts"].to_numpy(dtype=np.float64)[rows]
        counts = sp.csr_matrix(sp.diags(target_sum / np.maximum(totals, 1.0)) @ counts)
    return counts.log1p() if log1p else counts


def split_features(datamodule: CellDataModule, adata: ad.AnnData, settings: DictConfig) -> dict[str, sp.csr_matrix]:
    return {
        split: normalised_counts(adata, datamodule.split_cells(split)["cell_id"].to_numpy(),
                                 settings.target_sum, settings.log1p)
        for split in SPLITS
    }


def frozen_encoder(cfg: DictConfig, datamodule: CellDataModule) -> TrainedClassifier:
    """The encoder ``model.encoder`` makes (new, seeded, or pretrained) with ``model.pooling``, or a run's best
    weights (``init_from``), frozen; its head, untrained, is never used."""
    bert = instantiate(cfg.model.encoder, _partial_=True)(vocabulary=vocabulary_of(datamodule), seed=cfg.seed)
    module = CellClassifier(bert_config=bert.config.to_dict(), class_names=datamodule.class_names,
                            special_token_ids=datamodule.special_token_ids, pooling=cfg.model.pooling, bert=bert,
                            tokenizer={"model_version": datamodule.settings.model_version,
                                       "input_size": datamodule.settings.resolved_input_size})
    if cfg.get("init_from"):
        log.info("embedding with the weights of %s", load_weights(module, cfg.init_from))
    module.requires_grad_(False)
    return TrainedClassifier(module.eval(), datamodule.dictionaries, datamodule.settings, {"run_name": cfg.run_name})


def split_embeddings(encoder: TrainedClassifier, datamodule: CellDataModule, batch_size: int
                     ) -> dict[str, np.ndarray]:
    """Each split's pooled embeddings, in the order of its cells (``split_cells``), as ``embed`` computes them."""
    return {split: encoder.apply(datamodule.store, datamodule.splits[split].positions, batch_size)[1]
            for split in SPLITS}


def predicted(model: Pipeline, features: sp.csr_matrix, targets: np.ndarray, donors: np.ndarray | None = None
              ) -> tuple[np.ndarray, float]:
    """A split's class probabilities and the mean negative log-likelihood of its true classes (a probability
    of 0, a kNN vote none of the neighbours cast, counts as 1e-12). ``donors``: the cells' donors, for a model
    that ``uses_donors``."""
    if hasattr(model, "predict_log_proba"):
        log_probabilities = model.predict_log_proba(features)
        probabilities = np.exp(log_probabilities)
    else:
        probabilities = model.predict_proba(features) if donors is None else model.predict_proba(features, donors)
        log_probabilities = np.log(np.clip(probabilities, 1e-12, 1.0))
    return probabilities, float(-log_probabilities[np.arange(len(targets)), targets].mean())


def fit_baseline_trust(cfg: DictConfig, datamodule: CellDataModule, val_probabilities: np.ndarray,
                       val_targets: np.ndarray, embeddings: dict[str, np.ndarray] | None) -> RunTrust:
    """The ``calibration`` fitted on the validation cells' probabilities, as a training run's is, so a baseline's
    calibrated, abstention and conformal figures stand beside the network's; a probe of embeddings also gets the
    kNN score (a sample of the training cells' embeddings as reference). A baseline has no logits: no energy
    score."""
    settings = trust_settings(cfg.get("calibration"))
    reference = None
    if embeddings is not None:
        train = embeddings[TRAIN]
        reference = train[sample_rows(len(train), settings["knn_reference_cells"], datamodule.seed)]
    return RunTrust.fit(settings, val_probabilities, val_targets, None,
                        embeddings[VAL] if embeddings is not None else None, reference, datamodule.split_donors(VAL))


# The keys of a baseline option that make its features, not its classifier.
FEATURE_KEYS = ("name", "features", "target_sum", "log1p", "embed_batch_size")


def build_baseline(settings: DictConfig) -> Pipeline:
    """The classifier the ``baseline`` option names, with its own keys."""
    return instantiate({key: value for key, value in OmegaConf.to_container(settings, resolve=True).items()
                        if key not in FEATURE_KEYS})


# The nodes of the train config a baseline does not use (the network's); of ``model`` it keeps the tokenizer,
# whose dictionaries choose the genes and the cells.
NETWORK_NODES = ("optimizer", "scheduler", "loss", "augment", "robust", "trainer", "callbacks", "init_from")


def baseline_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` less the network's nodes, so a baseline's config.yaml (and W&B config) holds only what it used (a
    probe of embeddings keeps the encoder's: ``model`` and ``init_from``)."""
    embeds = cfg.baseline.get("features") == "embedding"
    with open_dict(cfg):
        for node in NETWORK_NODES:
            if not (embeds and node == "init_from"):
                cfg.pop(node, None)
        if not embeds:
            cfg.model = {"tokenizer": cfg.model.tokenizer}
    return cfg


def run_baseline(cfg: DictConfig) -> dict[str, Any]:
    """Fit on the training donors, score val and test, write the run directory; return its metrics.json record."""
    layout = RunLayout(cfg.paths.run_dir)
    check_values(cfg)
    check_run_calibration(cfg)
    datamodule = build_datamodule(cfg)
    targets = {split: datamodule.splits[split].label_ids.astype(np.int64) for split in SPLITS}
    class_names = datamodule.class_names
    model = build_baseline(cfg.baseline)
    embeds = cfg.baseline.get("features") == "embedding"
    if embeds:
        encoder = frozen_encoder(cfg, datamodule)
        n_features = encoder.hidden_size
    else:
        adata = datamodule.cells.to_anndata()
        n_features = adata.n_vars
    check_fits(model, len(targets["train"]), n_features, len(np.unique(targets["train"])))
    prepare_run_dir(layout, overwrite=cfg.overwrite)
    accept_start(layout, cfg)
    features = (split_embeddings(encoder, datamodule, cfg.baseline.embed_batch_size) if embeds
                else split_features(datamodule, adata, cfg.baseline))
    donors = {split: datamodule.split_cells(split)["donor"].to_numpy() for split in SPLITS}
    by_donor = getattr(model, "uses_donors", False)
    if by_donor:  # scANVI: the donor its batch key; the held-out cells without labels (used when transductive)
        model.fit(features["train"], targets["train"], donors["train"],
                  [(features[split], donors[split]) for split in EVAL_SPLITS])
    else:
        model.fit(features["train"], targets["train"])
    log.info("%s fitted on %d training cells x %d %s", cfg.baseline.name, *features["train"].shape,
             "embedding dimensions" if embeds else "genes")

    scored = {split: predicted(model, features[split], targets[split], donors[split] if by_donor else None)
              for split in EVAL_SPLITS}
    trust = fit_baseline_trust(cfg, datamodule, scored[VAL][0], targets[VAL], features if embeds else None)
    final = {split: score_split(layout, split, datamodule.split_cells(split), targets[split], probabilities,
                                class_names, cfg.run_name, loss=loss, trust=trust,
                                embeddings=features[split] if embeds else None)
             for split, (probabilities, loss) in scored.items()}
    trust.save(layout.root)
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
