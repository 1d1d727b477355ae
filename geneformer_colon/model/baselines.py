"""The field's simple classifiers, set against the fine-tuned network (``baseline=<name>``, ``python baseline.py``).

Each is a scikit-learn estimator fitted on the training donors' cells only: their normalised counts (a
cell's counts scaled to ``target_sum`` and, with ``log1p``, log-transformed) and their labels. Everything a
baseline learns from data (the genes it keeps, the scaling, the principal components) is learnt in ``fit``,
so no validation or test donor's cells or labels reach it.

- ``naive_bayes``: multinomial naive Bayes over every gene (the project's first baseline).
- ``logreg``: CellTypist's recipe with scikit-learn: highly variable genes of the training cells (scanpy's
  ``highly_variable_genes``, Seurat flavour, on the log-normalised values), each gene scaled to unit
  variance and clipped at 10, then L2-penalised multinomial logistic regression (``C``).
- ``pca_knn``: the same genes and scaling, a PCA of the training cells (``n_pcs``) onto which every other
  cell is projected (scanpy ``ingest``'s label transfer), then a vote of the ``k`` nearest training cells.
- ``scanvi``: scvi-tools' scVI then scANVI (:class:`Scanvi`) on the raw counts of the training cells' highly
  variable genes, the donor as batch key; the held-out donors mapped onto it as new batches (scArches), or, with
  ``transductive``, their cells in the model from the start, unlabelled.
- ``frozen_probe``: logistic regression or kNN (:func:`frozen_probe`) on the pooled embeddings of a frozen
  encoder (:mod:`geneformer_colon.jobs.baseline` computes them).
"""

from __future__ import annotations

import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import MultinomialNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from geneformer_colon.common.console import quiet_libraries
from geneformer_colon.common.errors import InputError

# CellTypist clips scaled values here (its train: ``indata[indata > 10] = 10``).
CLIP = 10.0


class HighlyVariableGenes(BaseEstimator, TransformerMixin):
    """Keep the ``n_top_genes`` most variable genes of the cells ``fit`` sees (scanpy, Seurat flavour, on
    log-normalised values); a dense matrix of those genes out."""

    def __init__(self, n_top_genes: int = 2000) -> None:
        self.n_top_genes = n_top_genes

    def fit(self, features: sp.spmatrix, targets: np.ndarray | None = None) -> HighlyVariableGenes:
        n_genes = features.shape[1]
        if self.n_top_genes >= n_genes:
            self.genes_ = np.arange(n_genes)
            return self
        chosen = sc.pp.highly_variable_genes(ad.AnnData(sp.csr_matrix(features, dtype=np.float32)),
                                             n_top_genes=self.n_top_genes, flavor="seurat", inplace=False)
        self.genes_ = np.flatnonzero(chosen["highly_variable"].to_numpy())
        return self

    def transform(self, features: sp.spmatrix) -> np.ndarray:
        return np.asarray(sp.csr_matrix(features)[:, self.genes_].todense(), dtype=np.float64)


def clipped(values: np.ndarray) -> np.ndarray:
    return np.minimum(values, CLIP)


def scaled_genes(n_genes: int) -> list[tuple[str, object]]:
    """The steps CellTypist's recipe and the PCA share: the training cells' variable genes, scaled, clipped."""
    return [("genes", HighlyVariableGenes(n_genes)), ("scale", StandardScaler()),
            ("clip", FunctionTransformer(clipped))]


def naive_bayes(alpha: float = 1.0, fit_prior: bool = True) -> Pipeline:
    return Pipeline([("model", MultinomialNB(alpha=alpha, fit_prior=fit_prior))])


def logreg(C: float = 1.0, n_genes: int = 2000, max_iter: int = 1000, seed: int = 0) -> Pipeline:  # noqa: N803
    return Pipeline([*scaled_genes(n_genes),
                     ("model", LogisticRegression(C=C, max_iter=max_iter, random_state=seed))])


def pca_knn(n_pcs: int = 50, k: int = 15, n_genes: int = 2000, seed: int = 0) -> Pipeline:
    return Pipeline([*scaled_genes(n_genes), ("pca", PCA(n_components=n_pcs, random_state=seed)),
                     ("model", KNeighborsClassifier(n_neighbors=k))])


def frozen_probe(probe: str = "logreg", C: float = 1.0, k: int = 15, max_iter: int = 1000,  # noqa: N803
                 seed: int = 0) -> Pipeline:
    """The probe on embeddings: each dimension scaled, then L2 logistic regression (``logreg``) or a vote of the
    ``k`` nearest training cells (``knn``)."""
    models = {"logreg": lambda: LogisticRegression(C=C, max_iter=max_iter, random_state=seed),
              "knn": lambda: KNeighborsClassifier(n_neighbors=k)}
    if probe not in models:
        raise InputError(f"baseline.probe={probe}: no such probe; set it to {' or '.join(models)}")
    return Pipeline([("scale", StandardScaler()), ("model", models[probe]())])


# scANVI's label for a cell whose label it must not see.
UNLABELLED = "<unlabelled>"


class Scanvi(BaseEstimator, ClassifierMixin):
    """scvi-tools' scVI, then scANVI initialised from it (``SCANVI.from_scvi_model``), on raw counts with the donor
    as batch key; fitted on the training donors' labelled cells.

    ``fit`` gets the training cells' counts, classes and donors and the held-out cells' counts and donors
    (``held_out``, no labels). The genes are the ``n_genes`` most variable of the training cells. With
    ``transductive``, the held-out cells join the model from the start, labelled ``UNLABELLED`` (scANVI's own
    semi-supervised use); without, ``predict_proba`` maps the cells it is given onto the trained model as new
    batches (scArches: ``SCANVI.load_query_data``, ``query_epochs`` of training of the new donors' batch weights
    alone, the rest frozen), so the model never sees them before. Probabilities: ``predict(soft=True)``.
    """

    uses_donors = True

    def __init__(self, n_latent: int = 10, n_hidden: int = 128, n_layers: int = 1, epochs: int = 40,
                 scanvi_epochs: int = 10, query_epochs: int = 20, n_genes: int = 2000, batch_size: int = 128,
                 transductive: bool = False, seed: int = 0) -> None:
        self.n_latent, self.n_hidden, self.n_layers = n_latent, n_hidden, n_layers
        self.epochs, self.scanvi_epochs, self.query_epochs = epochs, scanvi_epochs, query_epochs
        self.n_genes, self.batch_size, self.transductive, self.seed = n_genes, batch_size, transductive, seed

    def cells(self, counts: sp.spmatrix, donors: np.ndarray, labels: np.ndarray | None = None) -> ad.AnnData:
        """Cells as scvi-tools reads them: the chosen genes' raw counts, ``donor`` and ``label`` (by class id)."""
        labels = np.full(len(donors), UNLABELLED) if labels is None else labels.astype(str)
        return ad.AnnData(sp.csr_matrix(counts, dtype=np.float32)[:, self.genes_],
                          obs=pd.DataFrame({"donor": np.asarray(donors, dtype=str), "label": labels},
                                           index=[f"cell{i}" for i in range(len(donors))]),
                          var=pd.DataFrame(index=[f"gene{g}" for g in self.genes_]))

    def train(self, model: object, epochs: int, **settings: object) -> None:
        model.train(max_epochs=epochs, batch_size=self.batch_size, accelerator="cpu", enable_progress_bar=False,
                    **settings)

    def fit(self, counts: sp.spmatrix, targets: np.ndarray, donors: np.ndarray,
            held_out: list[tuple[sp.spmatrix, np.ndarray]] = ()) -> Scanvi:
        import scvi

        quiet_scvi(scvi, self.seed)
        self.classes_ = np.unique(targets)
        totals = np.maximum(np.asarray(counts.sum(1)).ravel(), 1.0)
        self.genes_ = HighlyVariableGenes(self.n_genes).fit(
            (sp.diags(1e4 / totals) @ sp.csr_matrix(counts, dtype=np.float64)).log1p()).genes_
        parts = [self.cells(counts, donors, targets)]
        if self.transductive:
            parts += [self.cells(other, other_donors) for other, other_donors in held_out]
        cells = ad.concat(parts, index_unique="-")
        scvi.model.SCVI.setup_anndata(cells, batch_key="donor")
        vae = scvi.model.SCVI(cells, n_latent=self.n_latent, n_hidden=self.n_hidden, n_layers=self.n_layers)
        self.train(vae, self.epochs)
        self.model_ = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELLED, labels_key="label",
                                                        adata=cells)
        self.train(self.model_, self.scanvi_epochs)
        return self

    def predict_proba(self, counts: sp.spmatrix, donors: np.ndarray) -> np.ndarray:
        import scvi

        quiet_scvi(scvi, self.seed)
        cells, model = self.cells(counts, donors), self.model_
        if not self.transductive:
            model = scvi.model.SCANVI.load_query_data(cells, self.model_, accelerator="cpu")
            self.train(model, self.query_epochs, plan_kwargs={"weight_decay": 0.0})
        soft = model.predict(cells, soft=True, batch_size=self.batch_size)
        return soft[[str(label) for label in self.classes_]].to_numpy(dtype=np.float64)


def quiet_scvi(scvi: object, seed: int) -> None:
    """scvi-tools seeded (torch, numpy, random); its info lines off, and those of the ``lightning`` package it
    imports (which sets its loggers back to INFO on import)."""
    quiet_libraries()
    scvi.settings.verbosity = logging.WARNING
    # not news: a small cohort's epoch is shorter than Lightning's logging interval; scArches freezes modules
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    scvi.settings.seed = seed


def check_fits(model: Pipeline | Scanvi, n_cells: int, n_genes: int, n_classes: int, key: str = "baseline") -> None:
    """One line for settings the training cells cannot carry, before anything is fitted or written."""
    if n_classes < 2:
        raise InputError(f"the training donors' cells hold {n_classes} class; a classifier needs two or more: "
                         "choose data.val_donors/data.test_donors (or data.labels) that leave two classes to train on")
    steps = dict(getattr(model, "steps", ()))
    if "pca" in steps:
        kept = min(steps["genes"].n_top_genes, n_genes)
        if steps["pca"].n_components > min(kept, n_cells):
            raise InputError(f"{key}.n_pcs={steps['pca'].n_components}: above the {kept} genes or {n_cells} training "
                             f"cells there are; set {key}.n_pcs to {min(kept, n_cells)} or less")
    if isinstance(steps.get("model"), KNeighborsClassifier) and steps["model"].n_neighbors > n_cells:
        raise InputError(f"{key}.k={steps['model'].n_neighbors}: more neighbours than the {n_cells} training cells; "
                         f"set {key}.k to {n_cells} or less")
