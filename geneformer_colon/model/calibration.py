"""Whether a probability of 0.9 means 90%: calibration figures of class probabilities, and the post-hoc maps
that correct them (``calibration=none|temperature|vector``), fitted on the validation donors' cells.

The figures: expected calibration error over 15 equal-width bins of the top-label confidence
(torchmetrics' ``MulticlassCalibrationError``, L1) and classwise (the mean over classes of each class's
probability against whether the cell is of that class: torchmetrics' ``BinaryCalibrationError``), the
multiclass Brier score (the mean over cells of the squared distance between the probabilities and the one-hot
truth, summed over classes) and the negative log-likelihood of the true class.

The maps act on the log-probabilities ``z = log p`` of whatever model gave them (a network, a fold ensemble,
a baseline): temperature scaling ``softmax(z / T)`` (Guo et al. 2017) is exactly temperature scaling of the
network's logits, which equal ``z`` up to a constant per cell; vector scaling ``softmax(w * z + b)`` (a weight
and a bias a class) is Guo's vector scaling of those log-probabilities. Both minimise the negative
log-likelihood of the validation cells' true classes (scipy's L-BFGS-B); temperature scaling never changes a
cell's predicted class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import logsumexp
from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

from geneformer_colon.common.errors import InputError

BINS = 15
METHODS = ("none", "temperature", "vector")
# The smallest probability a log is taken of (a float32 softmax can round a class to 0).
FLOOR = 1e-30


def calibration_figures(probabilities: np.ndarray, targets: np.ndarray, bins: int = BINS) -> dict[str, float]:
    """``ece`` (top-label), ``classwise_ece``, ``brier`` and ``nll`` of class probabilities (cells x classes)
    against the true class indices."""
    n_classes = probabilities.shape[1]
    preds, truth = torch.from_numpy(np.asarray(probabilities, dtype=np.float64)), torch.from_numpy(
        np.asarray(targets, dtype=np.int64))
    top = MulticlassCalibrationError(n_classes, n_bins=bins, norm="l1")(preds, truth).item()
    classwise = np.mean([BinaryCalibrationError(n_bins=bins, norm="l1")(preds[:, k], (truth == k).long()).item()
                         for k in range(n_classes)])
    onehot = np.eye(n_classes)[targets]
    true_class = probabilities[np.arange(len(targets)), targets]
    return {"ece": float(top), "classwise_ece": float(classwise),
            "brier": float(((probabilities - onehot) ** 2).sum(axis=1).mean()),
            "nll": float(-np.log(np.maximum(true_class, FLOOR)).mean())}


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(probabilities, dtype=np.float64), FLOOR))


@dataclass(frozen=True)
class Calibration:
    """A fitted map of class probabilities: ``method`` none (identity), temperature (``temperature``) or vector
    (``weights`` and ``bias``, one a class)."""

    method: str = "none"
    temperature: float = 1.0
    weights: list[float] = field(default_factory=list)
    bias: list[float] = field(default_factory=list)

    @classmethod
    def fit(cls, method: str, probabilities: np.ndarray, targets: np.ndarray, steps: int = 200) -> Calibration:
        """The ``method``'s map with the least negative log-likelihood of ``targets`` (the validation cells')."""
        check_method(method)
        if method == "none":
            return cls()
        z = log_probabilities(probabilities)
        n_cells, n_classes = z.shape
        onehot = np.eye(n_classes)[np.asarray(targets, dtype=np.int64)]

        def nll(parameters: np.ndarray) -> tuple[float, np.ndarray]:
            """The mean NLL of the scaled log-probabilities and its gradient in the parameters: log T for
            temperature scaling (T stays positive), the weights then the biases for vector scaling."""
            scaled = z * np.exp(-parameters[0]) if method == "temperature" else \
                z * parameters[:n_classes] + parameters[n_classes:]
            norm = logsumexp(scaled, axis=1)
            per_scaled = (np.exp(scaled - norm[:, None]) - onehot) / n_cells
            loss = float(np.mean(norm - (scaled * onehot).sum(axis=1)))
            if method == "temperature":
                return loss, np.array([-(per_scaled * scaled).sum()])
            return loss, np.concatenate([(per_scaled * z).sum(axis=0), per_scaled.sum(axis=0)])

        start = np.zeros(1) if method == "temperature" else np.concatenate([np.ones(n_classes), np.zeros(n_classes)])
        fitted = minimize(nll, start, jac=True, method="L-BFGS-B", options={"maxiter": steps}).x
        if method == "temperature":
            return cls(method, temperature=float(np.exp(fitted[0])))
        return cls(method, weights=fitted[:n_classes].tolist(), bias=fitted[n_classes:].tolist())

    def apply(self, probabilities: np.ndarray) -> np.ndarray:
        """The calibrated probabilities (NaN rows, cells without a prediction, stay NaN)."""
        if self.method == "none":
            return probabilities
        z = log_probabilities(probabilities)
        z = z / self.temperature if self.method == "temperature" else z * np.asarray(self.weights) + np.asarray(
            self.bias)
        z = z - z.max(axis=1, keepdims=True)
        scaled = np.exp(z)
        return scaled / scaled.sum(axis=1, keepdims=True)

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {"method": self.method}
        if self.method == "temperature":
            values["temperature"] = self.temperature
        elif self.method == "vector":
            values.update(weights=list(self.weights), bias=list(self.bias))
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Calibration:
        check_method(values.get("method", "none"))
        return cls(values.get("method", "none"), float(values.get("temperature", 1.0)),
                   [float(w) for w in values.get("weights", [])], [float(b) for b in values.get("bias", [])])


def check_method(method: str) -> None:
    if method not in METHODS:
        raise InputError(f"calibration.method: {method!r} is no calibration; choose one of {', '.join(METHODS)}")
