"""The paper's learning-rate schedule: linear warm-up to the peak, then cosine decay to a floor.

A.2: "The learning rate linearly increases to 1e-4 in the first epoch and then decreases to 1e-6
with a cosine decay scheduler." Expressed per optimisation step so it is exact for any epoch length.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["warmup_cosine"]


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_steps: int, min_lr: float
) -> LambdaLR:
    """Per-step schedule: 0 -> base lr over ``warmup_steps``, then cosine to ``min_lr``.

    Args:
        optimizer: Optimiser whose ``lr`` is the peak learning rate.
        total_steps: Number of optimisation steps of the whole run.
        warmup_steps: Steps of linear warm-up (the paper: one epoch).
        min_lr: Learning rate reached at the last step.
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps})")
    peaks = [group["lr"] for group in optimizer.param_groups]

    def factor(step: int, peak: float) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        floor = min_lr / peak
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, [lambda s, p=p: factor(s, p) for p in peaks])
