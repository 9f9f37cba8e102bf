"""Self-supervised methods: backbone + heads + loss, forward returns (loss, features).

Every method exposes ``.backbone`` (the trained backbone whose features the kNN evaluates) and
``forward(x1, x2, moco_m=None) -> (loss, features)``; those with a momentum (target) encoder also expose
``update_momentum(m)``.
"""

from __future__ import annotations

from torch import nn

from trainers.methods.byol import BYOL
from trainers.methods.moco_v3 import MoCoV3
from trainers.methods.simclr import SimCLR
from trainers.registry import METHODS


def is_vit(backbone: nn.Module) -> bool:
    """A ViT (plain patch embedding or conv stem) has ``patch_embed``; a ResNet does not."""
    return hasattr(backbone, "patch_embed")


def build_method(name: str, backbone: nn.Module, *, dim: int, mlp_dim: int, temperature: float) -> nn.Module:
    """Build method ``name`` around ``backbone`` with the head recipe of the backbone's family.

    MoCo v3 (paper Sec. 3 / appendix): ViT -> 3-layer projector and 2-layer predictor, both with last BN;
    ResNet -> 2-layer projector with last BN and 2-layer predictor without. BYOL and SimCLR take the same
    projector depth (3 on a ViT, 2 on a ResNet) so that the frameworks differ in their loss and target, not
    in head capacity; BYOL's heads have no last BN, SimCLR's projector has one. BYOL ignores ``temperature``.
    """
    vit = is_vit(backbone)
    proj_layers = 3 if vit else 2
    if name == "moco_v3":
        return MoCoV3(backbone, dim=dim, mlp_dim=mlp_dim, temperature=temperature, proj_layers=proj_layers,
                      pred_layers=2, pred_last_bn=vit)
    if name == "byol":
        return BYOL(backbone, dim=dim, mlp_dim=mlp_dim, proj_layers=proj_layers, pred_layers=2)
    if name == "simclr":
        return SimCLR(backbone, dim=dim, mlp_dim=mlp_dim, temperature=temperature, proj_layers=proj_layers)
    raise ValueError(f"unknown method {name!r}; accepted: {', '.join(METHODS)}")


__all__ = ["BYOL", "METHODS", "MoCoV3", "SimCLR", "build_method", "is_vit"]
