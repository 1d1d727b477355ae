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
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import MultinomialNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

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


def check_fits(model: Pipeline, n_cells: int, n_genes: int, n_classes: int, key: str = "baseline") -> None:
    """One line for settings the training cells cannot carry, before anything is fitted or written."""
    if n_classes < 2:
        raise InputError(f"the training donors' cells hold {n_classes} class; a classifier needs two or more: "
                         "choose data.val_donors/data.test_donors (or data.labels) that leave two classes to train on")
    steps = dict(model.steps)
    if "pca" in steps:
        kept = min(steps["genes"].n_top_genes, n_genes)
        if steps["pca"].n_components > min(kept, n_cells):
            raise InputError(f"{key}.n_pcs={steps['pca'].n_components}: above the {kept} genes or {n_cells} training "
                             f"cells there are; set {key}.n_pcs to {min(kept, n_cells)} or less")
    if isinstance(steps["model"], KNeighborsClassifier) and steps["model"].n_neighbors > n_cells:
        raise InputError(f"{key}.k={steps['model'].n_neighbors}: more neighbours than the {n_cells} training cells; "
                         f"set {key}.k to {n_cells} or less")
