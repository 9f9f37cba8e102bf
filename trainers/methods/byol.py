"""BYOL (Grill et al. 2020, arXiv 2006.07733), as the MoCo v3 paper ran it with ViT (arXiv 2104.02057, Table 4)."""

from __future__ import annotations

from torch import nn

from trainers.heads import mlp
from trainers.losses import ByolLoss
from trainers.methods.momentum import MomentumPair


class BYOL(MomentumPair):
    """Online network p = predictor(projector(backbone)), target network z = EMA of backbone + projector (BYOL's
    target is ``momentum_backbone`` + ``momentum_projector`` here, the names MoCo v3 gives the same structure).

    The loss is L(p1, z2) + L(p2, z1) with L = 2 - 2 cos (paper eq. 2, symmetrised by summing). The target has no
    predictor and gets no gradient. Heads have BN in their hidden layers only (``last_bn=False``), as in BYOL.
    ``moco_m`` is the target decay rate tau (the trainer's cosine schedule from tau0 towards 1).
    """

    def __init__(self, backbone: nn.Module, *, dim: int = 256, mlp_dim: int = 4096, proj_layers: int = 2,
                 pred_layers: int = 2, fuse_views: bool | None = None, view_chunk: int | None = None) -> None:
        super().__init__(backbone, mlp(proj_layers, backbone.num_features, mlp_dim, dim, last_bn=False),
                         mlp(pred_layers, dim, mlp_dim, dim, last_bn=False), ByolLoss(),
                         fuse_views=fuse_views, view_chunk=view_chunk)
