"""The figures of which calls to trust: a split's reliability diagram (before and after calibration) and its
accuracy and macro F1 against coverage (overall and a line a donor)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from geneformer_colon.common.io import atomic_path

# Every run draws these for each split: small, plainly laid out figures keep that cheap (about 0.1 s each).
SIZE, DPI = (4.2, 3.8), 90


def lean_figure() -> tuple[Figure, object]:
    """A figure of one axis from 0 to 1 both ways, three ticks each (tick labels are most of a plot's cost)."""
    figure = Figure(figsize=SIZE)
    figure.subplots_adjust(left=0.13, bottom=0.12, right=0.97, top=0.9)
    axis = figure.subplots()
    axis.set_xticks([0, 0.5, 1])
    axis.set_yticks([0, 0.5, 1])
    return figure, axis


def save_lean(figure: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)


def reliability_bins(probabilities: np.ndarray, targets: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray,
                                                                                            np.ndarray]:
    """The mean top-label confidence, accuracy and cell count of each of ``bins`` equal-width bins."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    index = np.clip(np.searchsorted(np.linspace(0, 1, bins + 1), confidence, side="right") - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.bincount(index, confidence, bins) / counts, np.bincount(index, correct, bins) / counts, counts)


def plot_reliability(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], bins: int, path: Path, title: str) -> None:
    """Accuracy against confidence in equal-width bins, one line a probability set (``{"raw": (p, y), ...}``),
    with the diagonal a calibrated model follows."""
    figure, axis = lean_figure()
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    for name, (probabilities, targets) in curves.items():
        confidence, accuracy, counts = reliability_bins(probabilities, targets, bins)
        shown = counts > 0
        axis.plot(confidence[shown], accuracy[shown], marker="o", markersize=3, label=name)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("confidence (top class probability)")
    axis.set_ylabel("accuracy")
    axis.set_title(title, fontsize=8)
    axis.legend(fontsize=7, loc="upper left")
    save_lean(figure, path)


def plot_coverage(curves: Mapping[str, Mapping[str, np.ndarray]], path: Path, title: str) -> None:
    """Accuracy (solid) and macro F1 (dashed) of the surest cells against the share answered, a colour a group
    (``{"all": {"coverage": ..., "accuracy": ..., "macro_f1": ...}, "<donor>": ...}``)."""
    figure, axis = lean_figure()
    for index, (name, curve) in enumerate(curves.items()):
        colour = f"C{index}"
        axis.plot(curve["coverage"], curve["accuracy"], color=colour, label=f"{name} accuracy")
        axis.plot(curve["coverage"], curve["macro_f1"], color=colour, linestyle="--", label=f"{name} macro F1")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("coverage (share of cells answered, surest first)")
    axis.set_ylabel("figure on the answered cells")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=6, loc="lower left", ncol=2)
    save_lean(figure, path)
