"""Cell embeddings and the donor-shift picture (embed.py): a run's cells or a file's, UMAPs coloured by donor, label,
prediction and cell type, silhouettes scored; a CV run's fold on its own cells."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd

from geneformer_colon.cli import verbs as cli
from geneformer_colon.jobs.embed import embed


def test_embed_draws_the_donor_shift_and_scores_it(trained_runs, new_cells, tmp_path, capsys):
    cli.main(["embed", str(trained_runs[0]), "--out", str(tmp_path / "embed")])
    assert "silhouette by label" in capsys.readouterr().out
    scores = json.loads((tmp_path / "embed" / "silhouette.json").read_text())
    assert scores["cells"] > 50 and all(np.isfinite(value) for value in scores["silhouette"].values())
    for colour in ("donor", "label", "predicted", "cell_type"):
        assert (tmp_path / "embed" / f"umap_{colour}.png").stat().st_size > 10_000, colour
    embedded = ad.read_h5ad(tmp_path / "embed" / "embedding.h5ad")
    assert set(embedded.obs["donor"]) == {"KUL19", "KUL01"} and embedded.obsm["X_umap"].shape[1] == 2

    of_file = embed(trained_runs[0], new_cells, tmp_path / "file", colours=["predicted", "batch"], layer="counts")
    assert of_file["cells"] == ad.read_h5ad(new_cells).n_obs and (tmp_path / "file" / "umap_batch.png").is_file()


def test_a_cv_runs_fold_is_embedded_on_its_own_cells_by_its_own_model(two_fold_cv_run, tmp_path):
    fold = two_fold_cv_run / "folds" / "KUL19"
    cli.main(["embed", str(two_fold_cv_run), "--fold", "KUL19", "--color", "donor", "--out", str(tmp_path / "e")])
    embedded = ad.read_h5ad(tmp_path / "e" / "embedding.h5ad")
    predictions = pd.concat([pd.read_csv(fold / "predictions" / f"{split}.csv") for split in ("val", "test")])
    predictions = predictions.set_index("cell_id")
    assert sorted(embedded.obs_names) == sorted(predictions.index)  # the fold's validation and test cells
    assert (embedded.obs["predicted"] == predictions.loc[embedded.obs_names, "predicted"]).all()
    assert embedded.obsm["X_gfc"].shape[1] == 32  # one fold's embedding, not the ensemble's two side by side
