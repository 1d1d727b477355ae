"""Gene attributions by integrated gradients (explain.py): they find the synthetic cohort's planted Tumor programme,
and their completeness (attributions summing to the change of the output) holds; the default target, the masked
baseline, and a CV run's folds (an ensemble refused)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from helpers.runs import programme_auroc
from helpers.tiny import CLASSES

from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.cli import verbs as cli
from geneformer_colon.jobs.cell_choice import select_cells
from geneformer_colon.jobs.explain import explain
from geneformer_colon.jobs.predict import GeneIds


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


def logit_differences(run_dir, where: list[str], max_cells: int, baseline_token: str) -> tuple[list[str], np.ndarray]:
    """The chosen cells' ids and, per class, their logit minus that of the cell with every gene token replaced by
    ``baseline_token``: what integrated gradients must add up to (computed here without captum)."""
    model = TrainedClassifier.load(run_dir)
    cells = select_cells(model, run_dir, None, where, max_cells, 0, GeneIds(), None).cells
    input_ids, attention_mask = cells.tokens.padded(cells.rows, model.pad_id)
    baseline = torch.where(attention_mask.bool(), model.dictionaries.token[baseline_token], input_ids)
    with torch.inference_mode():
        logits = [model.module.eval().infer(ids, attention_mask).logits.numpy() for ids in (input_ids, baseline)]
    return list(cells.obs.index), logits[0] - logits[1]


def attribution_sums(out) -> pd.Series:
    """Each explained cell's attributions summed over its genes (every gene: --min-cells 1), by cell id."""
    cells = ad.read_h5ad(out / "attributions.h5ad")
    return pd.Series(np.asarray(cells.X.sum(1)).ravel(), index=cells.obs_names)


def test_the_default_target_is_each_cells_predicted_class(trained_runs, tmp_path):
    run_dir = trained_runs[0]
    out, _ = explain(run_dir, where=["donor=KUL01"], max_cells=6, min_cells=1, steps=8, out_dir=tmp_path / "e")
    cells = ad.read_h5ad(out / "attributions.h5ad")
    predicted = pd.read_csv(run_dir / "predictions" / "test.csv").set_index("cell_id")["predicted"]
    assert (cells.obs["explained"] == cells.obs["predicted"]).all()
    assert (cells.obs["predicted"] == predicted[cells.obs_names]).all()  # the run's own calls
    assert json.loads((out / "settings.json").read_text())["target"] == "predicted class"
    # the attributions add up to the change of the predicted class's logit, not another class's
    ids, differences = logit_differences(run_dir, ["donor=KUL01"], 6, "<pad>")
    sums = attribution_sums(out)[ids].to_numpy()
    explained = [CLASSES.index(name) for name in cells.obs.loc[ids, "explained"]]
    np.testing.assert_allclose(sums, differences[np.arange(len(ids)), explained], atol=1e-3)
    for other in range(len(CLASSES)):
        assert other in explained or not np.allclose(sums, differences[:, other], atol=1e-3), other


def test_baseline_mask_integrates_from_every_gene_masked(trained_runs, tmp_path, capsys):
    run_dir = trained_runs[0]
    out = tmp_path / "mask"
    cli.main(["explain", str(run_dir), "--where", "donor=KUL01", "--max-cells", "6", "--min-cells", "1", "--steps", "8",
              "--baseline", "mask", "--out", str(out)])
    assert "completeness" in capsys.readouterr().out
    assert json.loads((out / "completeness.json").read_text())["baseline"] == "<mask>"
    ids, from_mask = logit_differences(run_dir, ["donor=KUL01"], 6, "<mask>")
    _, from_pad = logit_differences(run_dir, ["donor=KUL01"], 6, "<pad>")
    tumour = CLASSES.index("Tumor")  # what the run predicts for every cell
    sums = attribution_sums(out)[ids].to_numpy()
    np.testing.assert_allclose(sums, from_mask[:, tumour], atol=1e-3)
    assert np.abs(sums - from_pad[:, tumour]).max() > 1e-3  # the two baselines are told apart


def test_a_cv_run_is_explained_one_fold_at_a_time(two_fold_cv_run, tmp_path, capsys):
    refused = tmp_path / "ensemble"
    with pytest.raises(SystemExit) as raised:
        cli.main(["explain", str(two_fold_cv_run), "--steps", "2", "--out", str(refused)])
    error = capsys.readouterr().err.strip()
    assert raised.value.code == 2 and "\n" not in error and not refused.exists()
    assert "a cross-validated run; explain one of its folds with --fold DONOR (one of KUL01, KUL19)" in error

    out = tmp_path / "fold"
    cli.main(["explain", str(two_fold_cv_run), "--fold", "KUL19", "--max-cells", "8", "--min-cells", "1", "--steps",
              "2", "--out", str(out)])
    fold = two_fold_cv_run / "folds" / "KUL19"
    assert json.loads((out / "settings.json").read_text())["model"] == str(fold)
    donors = json.loads((fold / "metrics.json").read_text())["donors"]
    assert set(ad.read_h5ad(out / "attributions.h5ad").obs["donor"]) == {*donors["val"], *donors["test"]}
