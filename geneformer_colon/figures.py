"""The figures a run writes: confusion matrices, and a CV run's test macro F1 per donor."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from geneformer_colon.io import atomic_path


def save_figure(figure: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str) -> None:
    """Counts with row-normalised colour (recall along the diagonal)."""
    counts = np.asarray(matrix)
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 1.6 + 0.9 * len(class_names)
    figure = Figure(figsize=(size + 0.8, size))
    axis = figure.subplots()
    image = axis.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    for row in range(counts.shape[0]):
        for column in range(counts.shape[1]):
            colour = "white" if fractions[row, column] > 0.5 else "black"
            axis.text(column, row, f"{counts[row, column]}\n{fractions[row, column]:.2f}", ha="center", va="center",
                      fontsize=8, color=colour)
    axis.set_xticks(range(len(class_names)), class_names, rotation=30 if len(class_names) > 4 else 0)
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
