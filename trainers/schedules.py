"""Learning-rate and momentum schedules (MoCo v3 official ``main_moco.py``), evaluated per iteration."""

from __future__ import annotations

import math


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule: lr = base_lr * global_batch / 256."""
    return base_lr * global_batch / 256


def warmup_cosine(step: float, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then half-cosine to 0 at ``total_steps``.

    ``adjust_learning_rate`` of the official code with fractional epochs replaced by (fractional) steps.
    Steps past the end stay at 0 rather than climbing the next cosine period.
    """
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_momentum(progress: float, m0: float) -> float:
    """m = 1 - 0.5 * (1 + cos(pi * progress)) * (1 - m0): m0 at progress 0, 1 at progress 1 (clamped)."""
    progress = min(1.0, max(0.0, progress))
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - m0)
