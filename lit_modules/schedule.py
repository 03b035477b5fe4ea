"""The paper's learning-rate schedule: linear warm-up to the peak, then cosine decay to a floor.

A.2: "The learning rate linearly increases to 1e-4 in the first epoch and then decreases to 1e-6
with a cosine decay scheduler." Built from torch's own schedulers, per optimisation step so it is
exact for any epoch length: ``LinearLR`` from ``peak / warmup`` to the peak over the warm-up steps,
then ``CosineAnnealingLR`` down to ``min_lr`` at the last step.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

__all__ = ["warmup_cosine"]


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_steps: int, min_lr: float
) -> LRScheduler:
    """Per-step schedule: ``peak * (s + 1) / warmup_steps`` while warming up, then cosine.

    Step ``s`` of the warm-up already trains (the first step is not wasted at lr 0); the cosine
    reaches ``min_lr`` at step ``total_steps``.

    Args:
        optimizer: Optimiser whose ``lr`` is the peak learning rate.
        total_steps: Number of optimisation steps of the whole run.
        warmup_steps: Steps of linear warm-up (the paper: one epoch).
        min_lr: Learning rate reached at the last step.
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps})")
    decay = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=min_lr)
    if warmup_steps == 0:
        return decay
    warmup = LinearLR(
        optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=warmup_steps - 1
    )
    return SequentialLR(optimizer, [warmup, decay], milestones=[warmup_steps])
