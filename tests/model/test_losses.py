"""FocalLoss against F.cross_entropy and against the formula evaluated by hand in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.tiny import CLASSES

from geneformer_colon.common.errors import InputError
from geneformer_colon.model.losses import FocalLoss

WEIGHTS = {"Tumor": 2.2, "Normal": 1.0, "Border": 1.4}  # deliberately not in class order
W = np.array([1.0, 1.4, 2.2])
LOGITS = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-3.0, 1.0, 4.0]])
TARGET = np.array([0, 2, 1])


def reference(logits: np.ndarray, y: np.ndarray, w: np.ndarray, gamma: float, eps: float) -> float:
    """The documented formula, written out in float64 numpy."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    y = (1 - eps) * y + eps / y.shape[1]
    return float((w * y * (1 - p) ** gamma * -log_p).sum() / (w * y).sum())


def loss_of(target: np.ndarray, **kwargs) -> float:
    loss = FocalLoss(CLASSES, WEIGHTS, **kwargs)
    t = torch.tensor(target)
    return loss(torch.tensor(LOGITS, dtype=torch.float32), t if t.is_floating_point() else t.long()).item()


def test_gamma0_is_weighted_cross_entropy() -> None:
    got = loss_of(TARGET)
    expected_torch = F.cross_entropy(
        torch.tensor(LOGITS), torch.tensor(TARGET), weight=torch.tensor(W)
    ).item()
    # By hand, per sample: w_t * -log softmax(x)_t, then divided by the sum of w_t.
    nll = [np.log(np.exp(x).sum()) - x[t] for x, t in zip(LOGITS, TARGET)]
    by_hand = (W[TARGET] * nll).sum() / W[TARGET].sum()
    assert by_hand == pytest.approx(1.4597, abs=1e-4)  # (0.2413 + 2.2 * 1.0019 + 1.4 * 3.0495) / 4.6
    assert got == pytest.approx(expected_torch, rel=1e-6)
    assert got == pytest.approx(by_hand, rel=1e-6)


def test_unweighted_default() -> None:
    loss = FocalLoss(CLASSES)
    logits, target = torch.tensor(LOGITS, dtype=torch.float32), torch.tensor(TARGET)
    assert loss(logits, target).item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 1.5, 2.0])
def test_focal_gamma_by_hand(gamma: float) -> None:
    y = np.eye(3)[TARGET]
    got = loss_of(TARGET, focal_gamma=gamma)
    assert got == pytest.approx(reference(LOGITS, y, W, gamma, 0.0), rel=1e-5)
    assert got < loss_of(TARGET)  # the focal factor only shrinks terms


def test_soft_targets_and_smoothing() -> None:
    soft = np.array([[0.7, 0.3, 0.0], [0.0, 0.25, 0.75], [0.5, 0.5, 0.0]])
    assert loss_of(soft) == pytest.approx(reference(LOGITS, soft, W, 0.0, 0.0), rel=1e-5)
    assert loss_of(soft, focal_gamma=1.5, label_smoothing=0.1) == pytest.approx(
        reference(LOGITS, soft, W, 1.5, 0.1), rel=1e-5
    )
    # One-hot float targets are the same as class indices.
    assert loss_of(np.eye(3)[TARGET]) == pytest.approx(loss_of(TARGET), rel=1e-6)
    # Smoothing of hard targets, checked by hand for eps = 0.1 (targets 0.9333 / 0.0333).
    got = loss_of(TARGET, label_smoothing=0.1)
    assert got == pytest.approx(reference(LOGITS, np.eye(3)[TARGET], W, 0.0, 0.1), rel=1e-5)
    assert got != pytest.approx(loss_of(TARGET), rel=1e-3)


def test_extreme_logits_are_finite_with_finite_gradients() -> None:
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [0.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([0, 0, 2])
    for gamma, eps in [(0.0, 0.0), (0.5, 0.0), (2.0, 0.1)]:
        value = FocalLoss(CLASSES, WEIGHTS, focal_gamma=gamma, label_smoothing=eps)(logits, target)
        (grad,) = torch.autograd.grad(value, logits)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), (gamma, eps)
    # Confident and right is ~0 loss; confident and wrong is ~1e4.
    right = FocalLoss(CLASSES)(torch.tensor([[1e4, -1e4, 0.0]]), torch.tensor([0]))
    wrong = FocalLoss(CLASSES)(torch.tensor([[1e4, -1e4, 0.0]]), torch.tensor([1]))
    assert right.item() == 0.0 and wrong.item() == pytest.approx(2e4)


def test_gradient_matches_cross_entropy() -> None:
    logits = torch.tensor(LOGITS, requires_grad=True)
    FocalLoss(CLASSES, WEIGHTS)(logits, torch.tensor(TARGET)).backward()
    reference_logits = torch.tensor(LOGITS, requires_grad=True)
    F.cross_entropy(reference_logits, torch.tensor(TARGET), weight=torch.tensor(W)).backward()
    torch.testing.assert_close(logits.grad, reference_logits.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "weights, bad",
    [
        ({"Normal": 1.0, "Border": 1.4, "Tumour": 2.2}, "'Tumour'"),
        ({"Normal": 1.0, "Border": 1.4}, "missing 'Tumor'"),
        ({"Normal": 1.0, "Border": -1.0, "Tumor": 2.0}, "> 0"),
    ],
)
def test_class_weight_errors(weights: dict, bad: str) -> None:
    with pytest.raises(InputError) as error:
        FocalLoss(CLASSES, weights)
    message = str(error.value)
    assert "loss.class_weights" in message and bad in message
    assert all(name in message for name in CLASSES)


def test_bad_gamma_and_smoothing() -> None:
    with pytest.raises(InputError, match="loss.focal_gamma"):
        FocalLoss(CLASSES, focal_gamma=-1.0)
    with pytest.raises(InputError, match="loss.label_smoothing"):
        FocalLoss(CLASSES, label_smoothing=1.0)


def test_weights_follow_device_but_not_state_dict() -> None:
    loss = FocalLoss(CLASSES, WEIGHTS)
    assert loss.weight.tolist() == pytest.approx(W.tolist())
    assert "weight" not in loss.state_dict()
