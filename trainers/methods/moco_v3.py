"""MoCo v3 (Chen, Xie, He 2021, arXiv 2104.02057; Algorithm 1 and the official ``moco/builder.py``)."""

from __future__ import annotations

from torch import nn

from trainers.heads import mlp
from trainers.losses import CtrLoss
from trainers.methods.momentum import MomentumPair


class MoCoV3(MomentumPair):
    """Base encoder f_q = predictor(projector(backbone)), momentum encoder f_k = EMA of backbone + projector.

    The loss is ctr(q1, k2) + ctr(q2, k1) (summed, Algorithm 1). No queue: the negatives are the other keys
    of the global batch. The defaults are the ViT head recipe (3-layer projector, 2-layer predictor, both with
    last BN); the ResNet recipe is ``proj_layers=2, pred_layers=2, pred_last_bn=False`` (the projector keeps its
    last BN in both). ``trainers.methods.build_method`` picks the recipe from the backbone.
    """

    def __init__(self, backbone: nn.Module, *, dim: int = 256, mlp_dim: int = 4096, temperature: float = 0.2,
                 proj_layers: int = 3, pred_layers: int = 2, pred_last_bn: bool = True,
                 fuse_views: bool | None = None, view_chunk: int | None = None) -> None:
        super().__init__(backbone, mlp(proj_layers, backbone.num_features, mlp_dim, dim, last_bn=True),
                         mlp(pred_layers, dim, mlp_dim, dim, last_bn=pred_last_bn), CtrLoss(temperature),
                         fuse_views=fuse_views, view_chunk=view_chunk)
