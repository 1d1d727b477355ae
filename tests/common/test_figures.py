"""The figures a run writes (figures.py): what each one draws (read back from the figure before it is saved), and a
PNG written whole."""

from __future__ import annotations

import numpy as np
import pytest

from geneformer_colon.common import figures


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures the plotting functions hand to save_figure, instead of saving them."""
    saved = []
    monkeypatch.setattr(figures, "save_figure", lambda figure, path: saved.append((figure, path)))
    return saved


def test_a_confusion_matrix_shows_counts_and_each_true_classs_share(drawn, tmp_path):
    figures.plot_confusion([[3, 1], [0, 0]], ["Normal", "Tumor"], tmp_path / "confusion.png", "val")
    ((figure, path),) = drawn
    axis = figure.axes[0]
    assert path == tmp_path / "confusion.png" and axis.get_title() == "val"
    assert [text.get_text() for text in axis.texts] == ["3\n0.75", "1\n0.25", "0\n0.00", "0\n0.00"]
    assert [label.get_text() for label in axis.get_xticklabels()] == ["Normal", "Tumor"]


def test_class_curves_are_drawn_for_the_classes_present_with_their_areas(drawn, tmp_path):
    truth = np.array(["Normal", "Normal", "Tumor", "Tumor"])
    probabilities = np.array([[0.9, 0.0, 0.1], [0.6, 0.1, 0.3], [0.2, 0.1, 0.7], [0.1, 0.0, 0.9]])
    figures.plot_class_curves(truth, probabilities, ["Normal", "Border", "Tumor"], tmp_path / "roc.png",
                              tmp_path / "pr.png", "test")
    (roc, roc_path), (pr, pr_path) = drawn
    assert (roc_path, pr_path) == (tmp_path / "roc.png", tmp_path / "pr.png")
    roc_labels = [text.get_text() for text in roc.axes[0].get_legend().get_texts()]
    assert roc_labels == ["Normal (AUC 1.000)", "Tumor (AUC 1.000)"]  # no cell of Border: no curve for it
    assert [text.get_text() for text in pr.axes[0].get_legend().get_texts()] == ["Normal (AP 1.000)",
                                                                                 "Tumor (AP 1.000)"]


def test_the_loss_counts_epochs_from_one_and_leaves_missing_values_out(drawn, tmp_path):
    figures.plot_losses([0, 1, 2], [1.5, 1.0, None], [1.2, None, 0.8], tmp_path / "loss.png", "colon6")
    ((figure, _),) = drawn
    train, val = figure.axes[0].get_lines()
    assert (train.get_label(), list(train.get_xdata()), list(train.get_ydata())) == ("train", [1, 2], [1.5, 1.0])
    assert (val.get_label(), list(val.get_xdata()), list(val.get_ydata())) == ("validation", [1, 3], [1.2, 0.8])


def test_a_figure_is_a_png_written_whole(tmp_path):
    figures.plot_per_donor(["KUL01", "KUL19"], [0.7, 0.4], 1 / 3, tmp_path / "plots" / "cv.png", "colon6")
    assert (tmp_path / "plots" / "cv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [path.name for path in (tmp_path / "plots").iterdir()] == ["cv.png"]  # no temporary left beside it
