"""A split scored (scoring.py): its prediction table, its metrics.json entry with each donor's and cell type's figures
(equal to scikit-learn's on their rows), and its files in the run directory."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers.tiny import CLASSES
from sklearn.metrics import accuracy_score, f1_score

from geneformer_colon.assembly.scoring import group_metrics, prediction_table, score_split
from geneformer_colon.runs.layout import RunLayout


def cells_and_predictions(seed: int = 0, n: int = 60):
    """``n`` cells of two donors and two cell types, their classes (all three) and probabilities."""
    rng = np.random.default_rng(seed)
    cells = pd.DataFrame({"cell_id": [f"c{i}" for i in range(n)], "donor": np.repeat(["KUL01", "KUL19"], n // 2),
                          "cell_type": np.tile(["T cells", "Epithelial cells"], n // 2)})
    targets = np.arange(n) % 3
    probabilities = rng.dirichlet(np.ones(3), n)
    probabilities[targets == 0, 0] += 0.5  # Normal learnt, the rest at chance
    return cells, targets, probabilities / probabilities.sum(1, keepdims=True)


def test_the_table_names_each_cells_true_and_predicted_class_and_its_probabilities():
    cells, targets, probabilities = cells_and_predictions()
    table = prediction_table(cells, targets, probabilities, CLASSES)
    assert list(table.columns) == ["cell_id", "donor", "cell_type", "true", "predicted",
                                   "prob_Normal", "prob_Border", "prob_Tumor"]
    assert (table["true"] == np.array(CLASSES)[targets]).all()
    assert (table["predicted"] == np.array(CLASSES)[probabilities.argmax(1)]).all()


def test_a_groups_figures_are_scikit_learns_and_a_class_without_cells_has_no_recall_nor_roc_auc():
    cells, targets, probabilities = cells_and_predictions()
    table = prediction_table(cells, targets, probabilities, CLASSES)
    values = group_metrics(table, CLASSES)
    assert values["cells"] == 60
    assert values["accuracy"] == pytest.approx(accuracy_score(table["true"], table["predicted"]))
    assert values["macro_f1"] == pytest.approx(f1_score(table["true"], table["predicted"], average="macro"))
    assert values["macro_auroc"] is not None
    no_border = group_metrics(table[table["true"] != "Border"], CLASSES)
    assert no_border["recall/Border"] is None and no_border["macro_auroc"] is None
    assert no_border["recall/Normal"] == pytest.approx(
        (table["predicted"][table["true"] == "Normal"] == "Normal").mean())


def test_a_scored_split_writes_its_table_and_plots_and_breaks_its_figures_down(tmp_path):
    cells, targets, probabilities = cells_and_predictions()
    layout = RunLayout(tmp_path / "run")
    entry = score_split(layout, "test", cells, targets, probabilities, CLASSES, "colon6")
    table = pd.read_csv(layout.prediction_file("test"))
    assert len(table) == entry["cells"] == 60 and sum(map(sum, entry["confusion_matrix"])) == 60
    for plot in (layout.confusion_plot("test"), layout.curve_plot("roc", "test"), layout.curve_plot("pr", "test")):
        assert plot.stat().st_size > 1000, plot
    assert set(entry["by_donor"]) == {"KUL01", "KUL19"} and set(entry["by_cell_type"]) == {"T cells",
                                                                                          "Epithelial cells"}
    for donor, values in entry["by_donor"].items():
        rows = table[table["donor"] == donor]
        assert values["cells"] == len(rows)
        assert values["macro_f1"] == pytest.approx(f1_score(rows["true"], rows["predicted"], average="macro"))
    one_donor = score_split(RunLayout(tmp_path / "quiet"), "val", cells[cells["donor"] == "KUL01"],
                            targets[:30], probabilities[:30], CLASSES, "colon6", write=False)
    assert "by_donor" not in one_donor and "by_cell_type" in one_donor  # a breakdown only where there are groups
    assert not (tmp_path / "quiet").exists()


def test_a_split_scored_with_a_runs_calibration_has_its_trust_figures_by_donor(tmp_path):
    """With a run's trust (a temperature fitted on other cells): the calibration figures before and after, the
    abstention and conformal figures overall and for each donor (each its own cells' figures), the uncertainty
    scores and conformal sets in the table, a reliability diagram and coverage curves."""
    from geneformer_colon.assembly.trust import RunTrust
    from geneformer_colon.model.calibration import calibration_figures
    from geneformer_colon.model.uncertainty import aurc

    cells, targets, probabilities = cells_and_predictions(1, 90)
    sharp = probabilities ** 4 / (probabilities ** 4).sum(1, keepdims=True)
    trust = RunTrust.fit({"method": "temperature"}, sharp[:60], targets[:60], None, None, None, ["KUL01"])
    layout = RunLayout(tmp_path / "run")
    entry = score_split(layout, "test", cells, targets, sharp, CLASSES, "colon6", trust=trust,
                        logits=np.log(sharp) + 1.0)
    table = pd.read_csv(layout.prediction_file("test"), keep_default_na=False)
    assert entry["ece"] == pytest.approx(calibration_figures(sharp, targets)["ece"])
    assert entry["calibrated"]["nll"] == pytest.approx(calibration_figures(trust.calibration.apply(sharp),
                                                                           targets)["nll"])
    assert trust.calibration.temperature > 1.5 and entry["calibrated"]["nll"] < entry["nll"]
    assert set(entry["abstention"]["aurc_by_score"]) == {"max_softmax", "entropy", "energy"}
    assert 0 <= entry["conformal"]["coverage"] <= 1 and 1 <= entry["conformal"]["mean_set_size"] <= 3
    for donor, values in entry["by_donor"].items():
        rows = (cells["donor"] == donor).to_numpy()
        assert values["brier"] == pytest.approx(calibration_figures(sharp[rows], targets[rows])["brier"])
        assert values["aurc"] == pytest.approx(aurc(table["true"][rows] == table["predicted"][rows],
                                                    table["uncertainty_max_softmax"][rows]))
        sets = table["conformal_set"][rows].str.split("|")
        assert values["conformal"]["coverage"] == pytest.approx(np.mean([t in s for t, s in
                                                                         zip(table["true"][rows], sets)]))
    assert table["uncertainty_knn"].eq("").all()  # no reference cells given: no kNN score
    for kind in ("reliability", "coverage"):
        assert layout.trust_plot(kind, "test").stat().st_size > 1000
