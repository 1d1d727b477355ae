"""Cell embeddings and the donor-shift picture: ``geneformer-colon embed RUN_DIR [INPUT.h5ad]``.

The pooled embedding the classifier head sees, of the run's validation and test cells (or of
every cell of INPUT.h5ad), laid out by UMAP (scanpy: ``pp.neighbors`` on the embedding,
``tl.umap``) and drawn once a colouring (donor, label, predicted class, cell type). The silhouette
score of the embedding by label and by donor puts a number on the picture: a model that has
learnt the classes and not the donors scores high by label and low by donor.

Written to ``<run dir>/embed/<name>/``: ``umap_<colour>.png``, ``silhouette.json`` and
``embedding.h5ad`` (obs, ``obsm["X_gfc"]``, ``obsm["X_umap"]``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scanpy as sc  # noqa: E402
from sklearn.metrics import silhouette_score  # noqa: E402

from geneformer_colon.assembly.batching import token_budget  # noqa: E402
from geneformer_colon.assembly.builders import build_datamodule  # noqa: E402
from geneformer_colon.assembly.trained_classifier import TrainedClassifier  # noqa: E402
from geneformer_colon.common.errors import InputError  # noqa: E402
from geneformer_colon.common.figures import save_figure  # noqa: E402
from geneformer_colon.common.io import write_json  # noqa: E402
from geneformer_colon.common.names import EVAL_SPLITS  # noqa: E402
from geneformer_colon.common.output_folder import output_folder  # noqa: E402
from geneformer_colon.data.canonical import obs_strings  # noqa: E402
from geneformer_colon.data.h5ad import H5adReader  # noqa: E402
from geneformer_colon.jobs.evaluate import run_config  # noqa: E402
from geneformer_colon.jobs.predict import PREFIX, GeneIds, predicted_chunks  # noqa: E402
from geneformer_colon.runs.layout import RunLayout  # noqa: E402

log = logging.getLogger(__name__)

COLOURS = ("donor", "label", "predicted", "cell_type")
SILHOUETTE_BY = ("label", "donor")
# Silhouette scores are quadratic in the cells: at most this many, drawn at random (seeded).
SILHOUETTE_CELLS = 5000


def run_cells(model: TrainedClassifier, run_dir: Path, batch_size: int, device: str, max_tokens: int | None = None
              ) -> tuple[pd.DataFrame, np.ndarray]:
    """The run's validation and test cells from its token store: their obs and embeddings."""
    datamodule = build_datamodule(run_config(RunLayout(run_dir)))
    frames, embeddings = [], []
    for split in EVAL_SPLITS:
        cells = datamodule.split_cells(split)
        probabilities, embedded = model.apply(datamodule.store, datamodule.splits[split].positions, batch_size,
                                              max_tokens, device=device)
        frames.append(cells.set_index("cell_id")[["donor", "label", "cell_type"]].assign(
            split=split, predicted=np.asarray(model.class_names)[probabilities.argmax(1)]))
        embeddings.append(embedded)
    return pd.concat(frames), np.concatenate(embeddings)


def file_cells(model: TrainedClassifier, path: Path, genes: GeneIds, layer: str | None, batch_size: int, device: str,
               keys: dict[str, str | None], max_tokens: int | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Every cell of an h5ad: its obs (with the predicted class) and embeddings (cells without a gene dropped).
    ``keys``: the obs columns of ``label``, ``donor`` and ``cell_type`` (None: a column of that name, if any)."""
    with H5adReader(path, layer, layer_setting="--layer") as source:
        obs = source.obs.copy()
        named = {name: pd.Series(obs_strings(obs, key, path, f"--{name.replace('_', '-')}-key", f"the {name} column"),
                                 index=obs.index) for name, key in keys.items() if key is not None}
        obs = obs.drop(columns=[name for name in named if name in obs.columns]).assign(**named)
        embeddings = np.zeros((source.shape[0], model.hidden_size), dtype=np.float32)
        predicted = np.full(source.shape[0], "", dtype=object)
        for rows, probabilities, embedded in predicted_chunks(model, source, genes, batch_size=batch_size,
                                                              device=device, max_tokens=max_tokens):
            embeddings[rows] = embedded
            assigned = ~np.isnan(probabilities[:, 0])
            predicted[rows][assigned] = np.asarray(model.class_names)[probabilities[assigned].argmax(1)]
    kept = predicted != ""
    return obs.assign(predicted=predicted)[kept], embeddings[kept]


def silhouettes(embeddings: np.ndarray, obs: pd.DataFrame, seed: int = 0) -> dict[str, float | None]:
    """The silhouette of the embedding by each grouping there is (None: fewer than two groups)."""
    scores: dict[str, float | None] = {}
    for column in SILHOUETTE_BY:
        if column not in obs:
            continue
        groups = obs[column].astype(str).to_numpy()
        usable = 1 < len(set(groups)) < len(groups)
        scores[column] = float(silhouette_score(embeddings, groups, sample_size=min(len(groups), SILHOUETTE_CELLS),
                                                random_state=seed)) if usable else None
    return scores


def umap(obs: pd.DataFrame, embeddings: np.ndarray, seed: int = 0) -> ad.AnnData:
    adata = ad.AnnData(obs=obs.astype({c: "category" for c in obs.columns if obs[c].dtype == object}),
                       obsm={f"X_{PREFIX}": embeddings})
    adata.obs_names = adata.obs_names.astype(str)
    sc.pp.neighbors(adata, use_rep=f"X_{PREFIX}", n_neighbors=min(15, adata.n_obs - 1), random_state=seed)
    sc.tl.umap(adata, random_state=seed)
    return adata


def embed(model_path: str | Path, input_path: str | Path | None = None, out_dir: str | Path | None = None,
          colours: Sequence[str] | None = None, genes: GeneIds = GeneIds(), layer: str | None = None,
          batch_size: int | None = None, device: str = "cpu", fold: str | None = None, label_key: str | None = None,
          donor_key: str | None = None, cell_type_key: str | None = None, max_tokens: int | None = None
          ) -> dict[str, Any]:
    """UMAPs and silhouette scores of the embeddings (see the module docstring); returns the scores. A CV run:
    the ensemble's embeddings (its folds' side by side) of the INPUT's cells, or its ``fold``'s. ``colours``: obs
    columns to draw (default: those of ``COLOURS`` there are); ``*_key``: INPUT's obs columns of the labels, donors
    and cell types (default: columns of those names, if any)."""
    model = TrainedClassifier.load(model_path, fold)
    batch_size, max_tokens = token_budget(batch_size, max_tokens, model.settings.resolved_input_size)
    keys = {"label": label_key, "donor": donor_key, "cell_type": cell_type_key}
    if input_path is None:
        if "run_dir" not in model.origin:
            what = "a cross-validated run has no one validation and test split" if "folds" in model.origin \
                else "an export holds no cells of its own"
            raise InputError(f"{model_path}: {what}; give an INPUT.h5ad to embed (or --fold DONOR for a CV run's "
                             "fold and its cells)")
        given = [f"--{name.replace('_', '-')}-key" for name, key in keys.items() if key is not None]
        if given:
            raise InputError(f"{', '.join(given)}: for an INPUT.h5ad; the run's own cells have their labels, donors "
                             "and cell types")
        run_dir = Path(model.origin["run_dir"])
        out = Path(out_dir) if out_dir is not None else RunLayout(run_dir).embeddings / "val-test"
    else:
        out = Path(out_dir) if out_dir is not None else Path(input_path).with_name(f"{Path(input_path).stem}_embed")
    with output_folder(out, "embed", ("umap_*.png", "silhouette.json", "embedding.h5ad")) as written:
        if input_path is None:
            obs, embeddings = run_cells(model, run_dir, batch_size, device, max_tokens)
        else:
            obs, embeddings = file_cells(model, Path(input_path), genes, layer, batch_size, device, keys, max_tokens)
        if len(obs) < 3:
            raise InputError(f"{input_path or model_path}: {len(obs)} cells with a prediction; it takes 3 or more")
        if colours is None:
            colours = [colour for colour in COLOURS if colour in obs]
        missing = [colour for colour in colours if colour not in obs]
        if missing:
            raise InputError(f"--color {', '.join(missing)}: no such obs column (columns: {', '.join(obs.columns)}); "
                             "choose among those")
        unscored = [name for name in SILHOUETTE_BY if name not in obs]
        if unscored:
            log.warning("%s: no obs column %s: no silhouette by it (--%s-key names the column)", input_path,
                        " or ".join(unscored), "-key/--".join(unscored))
        adata = umap(obs, embeddings)
        scores = {"cells": int(adata.n_obs), "silhouette": silhouettes(embeddings, obs)}
        for colour in colours:
            figure = sc.pl.umap(adata, color=colour, return_fig=True, show=False,
                                title=f"{model.origin.get('run_name', Path(model_path).name)}: {colour}")
            save_figure(figure, written / f"umap_{colour}.png")
            plt.close(figure)
        write_json(written / "silhouette.json", scores)
        adata.write_h5ad(written / "embedding.h5ad")
    log.info("UMAPs, silhouette.json and embedding.h5ad written to %s", out)
    return scores
