"""Class-weighted focal cross-entropy with label smoothing and soft (mixup) targets."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from geneformer_colon.common.errors import InputError


class FocalLoss(nn.Module):
    """Weighted focal loss; plain weighted cross-entropy by default.

    With targets ``y`` (one-hot for class indices, or soft targets from mixup), smoothed as
    ``y = (1 - eps) * y + eps / C``, class probabilities ``p = softmax(logits)`` and class
    weights ``w``::

        loss = sum_i sum_c w_c y_ic (1 - p_ic)^gamma (-log p_ic) / sum_i sum_c w_c y_ic

    With ``focal_gamma=0``, ``label_smoothing=0`` and hard targets this equals
    ``F.cross_entropy(logits, target, weight=w)`` (the weighted mean over the batch).
    Note that PyTorch's own ``label_smoothing`` with weights is defined differently.

    ``class_weights`` maps class NAME to weight (``{"Normal": 1.0, "Border": 1.4, "Tumor": 2.2}``);
    every class needs one; ``None`` weighs all classes 1.
    """

    weight: torch.Tensor

    def __init__(
        self,
        class_names: Sequence[str],
        class_weights: Mapping[str, float] | None = None,
        focal_gamma: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        class_names = list(class_names)
        if class_weights is None:
            class_weights = dict.fromkeys(class_names, 1.0)
        unknown = [name for name in class_weights if name not in class_names]
        missing = [name for name in class_names if name not in class_weights]
        if unknown or missing:
            bad = ", ".join(
                [f"unknown {name!r}" for name in unknown] + [f"missing {name!r}" for name in missing]
            )
            raise InputError(
                f"loss.class_weights: {bad}; give one weight per class: {', '.join(class_names)}"
            )
        weights = [float(class_weights[name]) for name in class_names]
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise InputError(
                f"loss.class_weights: {dict(zip(class_names, weights))}; every weight must be a "
                "finite number > 0"
            )
        if not focal_gamma >= 0:
            raise InputError(f"loss.focal_gamma is {focal_gamma}; set it to a number >= 0")
        if not 0 <= label_smoothing < 1:
            raise InputError(f"loss.label_smoothing is {label_smoothing}; set it in [0, 1)")
        self.class_names = class_names
        self.focal_gamma = float(focal_gamma)
        self.label_smoothing = float(label_smoothing)
        # Not persistent: the weights come from the config, never from a resumed checkpoint.
        self.register_buffer("weight", torch.tensor(weights, dtype=torch.float32), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Loss of ``logits`` [B, C] against class indices [B] or soft targets [B, C]; ``sample_weight`` [B]
        weighs each cell on top of its class weight (in the sums above and below the line)."""
        n_classes = logits.shape[-1]
        log_p = F.log_softmax(logits.float(), dim=-1)
        if target.dtype.is_floating_point:
            y = target.float()
        else:
            y = F.one_hot(target, n_classes).float()
        if self.label_smoothing:
            y = (1 - self.label_smoothing) * y + self.label_smoothing / n_classes
        per_class = -log_p
        if self.focal_gamma:
            # 1 - p as -expm1(log p) keeps precision near p = 1; the clamp keeps the gradient of
            # (1 - p)^gamma finite where p rounds to exactly 1.
            one_minus_p = (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny)
            per_class = per_class * one_minus_p.pow(self.focal_gamma)
        wy = y * self.weight
        if sample_weight is not None:
            wy = wy * sample_weight.float()[:, None]
        return (wy * per_class).sum() / wy.sum()
