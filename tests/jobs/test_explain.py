"""Gene attributions by integrated gradients (explain.py): they find the synthetic cohort's planted Tumor programme,
and their completeness (attributions summing to the change of the output) holds."""

from __future__ import annotations

import json

import anndata as ad
import pandas as pd
import pytest
from helpers.runs import programme_auroc

from geneformer_colon.jobs.explain import explain


@pytest.mark.slow
def test_integrated_gradients_find_the_tumour_programme_and_add_up_to_the_change(programme_run, tmp_path):
    out, completeness = explain(programme_run, target="Tumor", where=["label=Tumor"], steps=16, out_dir=tmp_path / "e")
    attributed = pd.read_csv(out / "genes.csv")
    explain_auroc = programme_auroc(attributed, "mean_attribution", 1.0)
    print(f"programme AUROC: explain {explain_auroc:.3f}; completeness {completeness}")
    assert explain_auroc >= 0.8
    assert completeness["relative_mean_abs_delta"] < 0.05
    assert json.loads((out / "completeness.json").read_text()) == completeness
    cells = ad.read_h5ad(out / "attributions.h5ad")
    assert list(cells.var_names) == list(attributed["ensembl_id"]) and (cells.obs["explained"] == "Tumor").all()
