"""Files a run leaves behind: metrics JSON, prediction tables, confusion-matrix plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from geneformer_colon.io import atomic_path  # noqa: E402


def prediction_table(
    cells: pd.DataFrame, targets: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """One row a cell: id, donor, cell type, true and predicted class, one probability per class."""
    table = pd.DataFrame(
        {
            "cell_id": cells["cell_id"].to_numpy(),
            "donor": cells["donor"].to_numpy(),
            "cell_type": cells["cell_type"].to_numpy(),
            "true": np.asarray(class_names)[targets],
            "predicted": np.asarray(class_names)[probabilities.argmax(axis=1)],
        }
    )
    for column, name in enumerate(class_names):
        table[f"prob_{name}"] = probabilities[:, column]
    return table


def write_csv(path: str | Path, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def plot_confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path, title: str) -> None:
    """Counts with row-normalised colour (recall along the diagonal)."""
    counts = np.asarray(matrix)
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    figure, axis = plt.subplots(figsize=(4.2, 3.6))
    image = axis.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    for row in range(counts.shape[0]):
        for column in range(counts.shape[1]):
            colour = "white" if fractions[row, column] > 0.5 else "black"
            axis.text(column, row, f"{counts[row, column]}\n{fractions[row, column]:.2f}", ha="center", va="center",
                      fontsize=8, color=colour)
    axis.set_xticks(range(len(class_names)), class_names)
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def write_split_files(
    run_dir: str | Path,
    split: str,
    cells: pd.DataFrame,
    targets: np.ndarray,
    probabilities: np.ndarray,
    confusion: Sequence[Sequence[int]],
    class_names: Sequence[str],
    title: str,
) -> None:
    """``predictions/<split>.csv`` and ``plots/confusion_<split>.png`` of a run directory."""
    run_dir = Path(run_dir)
    write_csv(run_dir / "predictions" / f"{split}.csv", prediction_table(cells, targets, probabilities, class_names))
    plot_confusion(confusion, class_names, run_dir / "plots" / f"confusion_{split}.png", title)
