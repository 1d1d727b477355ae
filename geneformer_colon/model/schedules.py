"""Learning-rate schedules: transformers' own, with the warm-up given as a share of the steps."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from transformers import get_scheduler


def warmup_schedule(optimizer: Optimizer, num_training_steps: int, name: str = "linear", warmup_ratio: float = 0.1
                    ) -> LRScheduler:
    """``transformers.get_scheduler(name)`` warming up over ``warmup_ratio`` of ``num_training_steps``.

    ``name``: linear (warm-up, then linear decay to 0), cosine, constant_with_warmup, ... (any
    ``transformers.SchedulerType`` that steps with the optimizer).
    """
    return get_scheduler(name, optimizer, num_warmup_steps=round(warmup_ratio * num_training_steps),
                         num_training_steps=num_training_steps)
