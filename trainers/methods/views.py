"""Both augmented views through one encoder: as one batch where that computes exactly the same thing."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def has_batchnorm(module: nn.Module) -> bool:
    """Whether any submodule normalises over the batch (BatchNorm, SyncBatchNorm, GlobalBatchNorm)."""
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def encode_views(encoder: nn.Module, x1: Tensor, x2: Tensor, fused: bool) -> tuple[Tensor, Tensor]:
    """``(encoder(x1), encoder(x2))``; ``fused``: as one forward of the concatenated batch.

    Fuse only an encoder in which every sample is computed on its own (a LayerNorm ViT without dropout): the
    outputs are then the same up to the fp32 rounding of larger matmuls, and one batch of 2B runs faster than
    two of B. An encoder with BatchNorm (ViT-BN, ResNet, the heads) must see the views one at a time: its
    statistics are per view, as in the paper.
    """
    if not fused:
        return encoder(x1), encoder(x2)
    h1, h2 = encoder(torch.cat([x1, x2])).chunk(2)
    return h1, h2
