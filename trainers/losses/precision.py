"""The precision the losses compute their logits in, whatever autocast gives them."""

from __future__ import annotations

import torch
from torch import Tensor


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in float32 (from bf16 / fp16), or as it is when wider (a float64 reference computation)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
