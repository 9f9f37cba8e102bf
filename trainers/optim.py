"""Optimisers of the recipes, built from timm's and torch's implementations with the recipes' parameter groups.

- AdamW (ViT, MoCo v3 default): PyTorch defaults (betas 0.9/0.999, eps 1e-8), decoupled weight decay on
  every trainable tensor as in the official code (``exclude_1d=True`` leaves biases and norms undecayed).
- LARS (ResNet): momentum 0.9, trust coefficient 0.001; weight decay and the trust ratio only for tensors
  with ndim > 1 (official ``moco.optimizer.LARS``), via timm's Lars with one group per kind.
- LAMB (paper ablation): timm's Lamb.
"""

from __future__ import annotations

import torch
from timm.optim import Lamb, Lars
from torch import nn

OPTIMIZERS = ("adamw", "lars", "lamb")


def param_groups(model: nn.Module, weight_decay: float, exclude_1d: bool) -> list[dict]:
    """Trainable parameters split into decayed (ndim > 1, or all) and undecayed (ndim <= 1) groups."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not exclude_1d:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def create_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, *,
                     exclude_1d: bool | None = None) -> torch.optim.Optimizer:
    """The named optimiser over ``model``'s trainable parameters; ``exclude_1d`` None: the recipe's choice."""
    if name == "adamw":
        return torch.optim.AdamW(param_groups(model, weight_decay, bool(exclude_1d)), lr=lr)
    if name == "lars":
        groups = param_groups(model, weight_decay, exclude_1d=exclude_1d is not False)
        # timm adapts a group only when its decay is non-zero (or always_adapt): the official LARS adapts
        # every ndim > 1 tensor whatever the decay, and never the 1-D ones (the second group).
        groups[0]["always_adapt"] = True
        return Lars(groups, lr=lr, momentum=0.9, trust_coeff=0.001)
    if name == "lamb":
        return Lamb(param_groups(model, weight_decay, bool(exclude_1d)), lr=lr)
    raise ValueError(f"optimizer {name!r} is not one of: {', '.join(OPTIMIZERS)}")
