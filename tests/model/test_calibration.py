"""Calibration figures and maps (model/calibration.py): ECE (top-label and classwise, 15 bins), Brier and NLL equal
a direct numpy computation on hand-made probabilities; temperature and vector scaling fitted by NLL."""

from __future__ import annotations

import numpy as np
import pytest

from geneformer_colon.common.errors import InputError
from geneformer_colon.model.calibration import Calibration, calibration_figures


def hand_made(seed: int = 0, cells: int = 300, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities away from the bins' edges, and true classes drawn from them (roughly calibrated)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (cells, classes))
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    targets = np.array([rng.choice(classes, p=row) for row in probabilities])
    return probabilities, targets


def binned_error(confidence: np.ndarray, hit: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error written out: |accuracy - confidence| of each equal-width bin (a bin holds
    [edge_i, edge_i+1)), weighted by its share of the cells."""
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence >= low) & (confidence < high) if high < 1 else (confidence >= low)
        if inside.any():
            total += inside.mean() * abs(hit[inside].mean() - confidence[inside].mean())
    return total


def test_the_figures_equal_a_direct_numpy_computation():
    probabilities, targets = hand_made()
    figures = calibration_figures(probabilities, targets)
    top = binned_error(probabilities.max(1), probabilities.argmax(1) == targets)
    classwise = np.mean([binned_error(probabilities[:, k], targets == k) for k in range(3)])
    onehot = np.eye(3)[targets]
    assert figures["ece"] == pytest.approx(top, abs=1e-6)
    assert figures["classwise_ece"] == pytest.approx(classwise, abs=1e-6)
    assert figures["brier"] == pytest.approx(np.mean(((probabilities - onehot) ** 2).sum(1)), abs=1e-6)
    assert figures["nll"] == pytest.approx(-np.mean(np.log(probabilities[np.arange(300), targets])), abs=1e-6)
    assert figures["ece"] > 0.005  # the case is no trivial zero


def test_temperature_scaling_undoes_a_sharpened_model_and_keeps_its_calls():
    """Probabilities sharpened fivefold (a model's logits times 5): the fitted temperature is near 5, the NLL
    drops, and no cell's class changes; vector scaling lowers the NLL too; none is the identity."""
    probabilities, targets = hand_made(1, cells=2000)
    sharpened = probabilities ** 5 / (probabilities ** 5).sum(1, keepdims=True)
    fitted = Calibration.fit("temperature", sharpened, targets)
    assert fitted.temperature == pytest.approx(5, rel=0.15)
    calibrated = fitted.apply(sharpened)
    assert (calibrated.argmax(1) == sharpened.argmax(1)).all()
    before, after = calibration_figures(sharpened, targets), calibration_figures(calibrated, targets)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"]
    vector = Calibration.fit("vector", sharpened, targets)
    assert calibration_figures(vector.apply(sharpened), targets)["nll"] < before["nll"]
    assert Calibration.from_dict(vector.to_dict()) == vector
    assert Calibration.fit("none", sharpened, targets).apply(sharpened) is sharpened
    with pytest.raises(InputError, match="choose one of none, temperature, vector"):
        Calibration.fit("platt", sharpened, targets)
