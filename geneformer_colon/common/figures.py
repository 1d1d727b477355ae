"""The figures a run writes: confusion matrices, per-class ROC and precision-recall curves, the loss by epoch,
and a CV run's test macro F1 per donor."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

from geneformer_colon.common.io import atomic_path


def save_figure(figure: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str) -> None:
    """Counts with row-normalised colour (recall along the diagonal)."""
    counts = np.asarray(matrix)
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 1.6 + 0.9 * len(class_names)
    margin = 0.07 * max(map(len, class_names), default=0)  # inches for the longest name, below and left
    figure = Figure(figsize=(size + 0.8 + margin, size + margin), layout="constrained")
    axis = figure.subplots()
    image = axis.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    for row in range(counts.shape[0]):
        for column in range(counts.shape[1]):
            colour = "white" if fractions[row, column] > 0.5 else "black"
            axis.text(column, row, f"{counts[row, column]}\n{fractions[row, column]:.2f}", ha="center", va="center",
                      fontsize=8, color=colour)
    slanted = len(class_names) > 4 or max(map(len, class_names), default=0) > 10
    axis.set_xticks(range(len(class_names)), class_names, rotation=45 if slanted else 0, ha="right" if slanted else
                    "center", rotation_mode="anchor")
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axis, fraction=0.046, label="fraction of the true class")
    save_figure(figure, path)


def plot_per_donor(donors: Sequence[str], values: Sequence[float], chance: float, path: Path, title: str,
                   ylabel: str = "test macro F1") -> None:
    """One bar a donor (each the test donor of its fold), their mean, and the chance level."""
    figure = Figure(figsize=(1.5 + 0.7 * len(donors), 3.6))
    axis = figure.subplots()
    axis.bar(range(len(donors)), values, color="tab:blue")
    for position, value in enumerate(values):
        axis.text(position, value + 0.01, f"{value:.2f}", ha="center", va="bottom", fontsize=8)
    axis.axhline(float(np.mean(values)), color="tab:orange", label=f"mean {np.mean(values):.3f}")
    axis.axhline(chance, color="grey", linestyle="--", label=f"chance {chance:.2f}")
    axis.set_xticks(range(len(donors)), donors)
    axis.set_xlabel("test donor (left out)")
    axis.set_ylabel(ylabel)
    axis.set_ylim(0, 1)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(figure, path)


def plot_class_curves(truth: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str], roc_path: Path,
                      pr_path: Path, title: str) -> None:
    """One-vs-rest ROC and precision-recall curves, a curve a class with its area (ROC AUC; average precision,
    against the class's share as chance). A class with no cell, or only its cells, has no curve."""
    roc, pr = Figure(figsize=(4.8, 4.2)), Figure(figsize=(4.8, 4.2))
    roc_axis, pr_axis = roc.subplots(), pr.subplots()
    for column, name in enumerate(class_names):
        positive = np.asarray(truth) == name
        if positive.all() or not positive.any():
            continue
        scores = probabilities[:, column]
        false_positive, true_positive, _ = roc_curve(positive, scores)
        roc_axis.plot(false_positive, true_positive, label=f"{name} (AUC {auc(false_positive, true_positive):.3f})")
        precision, recall, _ = precision_recall_curve(positive, scores)
        line = pr_axis.plot(recall, precision, label=f"{name} (AP {average_precision_score(positive, scores):.3f})")
        pr_axis.axhline(positive.mean(), color=line[0].get_color(), linestyle=":", linewidth=0.8)
    roc_axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    for axis, (x, y), figure, path in ((roc_axis, ("false positive rate", "true positive rate"), roc, roc_path),
                                       (pr_axis, ("recall", "precision (dotted: the class's share)"), pr, pr_path)):
        axis.set_xlabel(x)
        axis.set_ylabel(y)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.02)
        axis.set_title(title, fontsize=9)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small", loc="lower right" if axis is roc_axis else "lower left")
        save_figure(figure, path)


def plot_losses(epochs: Sequence[int], train: Sequence[float | None], val: Sequence[float | None], path: Path,
                title: str) -> None:
    """Training and validation loss by epoch (counted from 1); missing values are left out."""
    figure = Figure(figsize=(4.8, 3.6))
    axis = figure.subplots()
    for values, label in ((train, "train"), (val, "validation")):
        points = [(epoch + 1, value) for epoch, value in zip(epochs, values) if value is not None]
        if points:
            axis.plot(*zip(*points), marker="o", label=label)
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss")
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_title(title, fontsize=9)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small")
    save_figure(figure, path)
