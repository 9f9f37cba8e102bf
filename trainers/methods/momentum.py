"""Exponential moving average of a trained encoder into its twin (MoCo v3 momentum encoder, BYOL target)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def trainable_pairs(online: Sequence[nn.Module], ema: Sequence[nn.Module]) -> tuple[list[Tensor], list[Tensor]]:
    """Trainable parameters of ``online`` and their twins in ``ema`` (deep copies: same parameter order)."""
    base = [p for m in online for p in m.parameters()]
    twins = [p for m in ema for p in m.parameters()]
    pairs = [(p, pm) for p, pm in zip(base, twins, strict=True) if p.requires_grad]
    return [p for p, _ in pairs], [pm for _, pm in pairs]


@torch.no_grad()
def ema_update_(online: Sequence[nn.Module], ema: Sequence[nn.Module], m: float) -> None:
    """p_ema <- m * p_ema + (1 - m) * p over the parameters of ``online`` and their twins in ``ema``.

    Parameters only, as in the official MoCo v3 ``_update_momentum_encoder`` and BYOL: the EMA twin's BN
    running statistics are its own (updated by its forward passes in train mode), not an EMA of the online ones.
    Frozen online parameters (sin-cos embedding, stop-grad patch projection) are skipped: they equal their
    twins, as an exact EMA would keep them, whereas m * x + (1 - m) * x in float32 drifts by rounding
    (~1e-4 after 20k steps).
    """
    base, twins = trainable_pairs(online, ema)
    torch._foreach_mul_(twins, m)  # one fused kernel per dtype/device instead of two per tensor
    torch._foreach_add_(twins, base, alpha=1.0 - m)
