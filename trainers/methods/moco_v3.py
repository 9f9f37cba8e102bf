"""MoCo v3 (Chen, Xie, He 2021, arXiv 2104.02057; Algorithm 1 and the official ``moco/builder.py``)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from trainers.heads import mlp
from trainers.losses import CtrLoss
from trainers.methods.momentum import ema_update_
from trainers.methods.views import encode_views, has_batchnorm, head_views


class MoCoV3(nn.Module):
    """Base encoder f_q = predictor(projector(backbone)), momentum encoder f_k = EMA of backbone + projector.

    The loss is ctr(q1, k2) + ctr(q2, k1) (summed, Algorithm 1). No queue: the negatives are the other keys
    of the global batch. The defaults are the ViT head recipe (3-layer projector, 2-layer predictor, both with
    last BN); the ResNet recipe is ``proj_layers=2, pred_layers=2, pred_last_bn=False`` (the projector keeps its
    last BN in both). ``trainers.methods.build_method`` picks the recipe from the backbone.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 256,
        mlp_dim: int = 4096,
        temperature: float = 0.2,
        proj_layers: int = 3,
        pred_layers: int = 2,
        pred_last_bn: bool = True,
        fuse_views: bool | None = None,
        view_chunk: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(proj_layers, backbone.num_features, mlp_dim, dim, last_bn=True)
        self.predictor = mlp(pred_layers, dim, mlp_dim, dim, last_bn=pred_last_bn)
        # Momentum copies start equal to the base and are only ever changed by update_momentum.
        self.momentum_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.criterion = CtrLoss(temperature)
        # Both views through the backbones together where that is exact (no BatchNorm inside): views.encode_views
        self.fuse_views = not has_batchnorm(backbone) if fuse_views is None else fuse_views
        self.view_chunk = view_chunk  # samples per fused backbone forward; None: views.encode_views decides

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """p_m <- m * p_m + (1 - m) * p over backbone + projector parameters (see ``ema_update_``)."""
        ema_update_((self.backbone, self.projector), (self.momentum_backbone, self.momentum_projector), m)

    def forward(self, x1: Tensor, x2: Tensor, moco_m: float | None = None) -> tuple[Tensor, Tensor]:
        """Return (loss, features): features are view 1's backbone outputs (detached) for a kNN monitor.

        The heads' BatchNorms see the two views separately, so that their statistics are per view (as in the
        official code; ``views.head_views``); the backbones too where they have BN (``fuse_views``).
        """
        # The official code updates the momentum encoder before computing the keys (same step's base weights).
        # moco_m None: the caller did (the Trainer, outside a compiled forward, where a float changing every
        # step would make torch.compile recompile every step).
        if moco_m is not None:
            self.update_momentum(moco_m)
        h1, h2 = encode_views(self.backbone, x1, x2, self.fuse_views, self.view_chunk)
        q1, q2 = head_views((self.projector, self.predictor), h1, h2)
        with torch.no_grad():
            g1, g2 = encode_views(self.momentum_backbone, x1, x2, self.fuse_views, self.view_chunk)
            k1, k2 = head_views((self.momentum_projector,), g1, g2)
        loss = self.criterion(q1, k2) + self.criterion(q2, k1)
        return loss, h1.detach()
