"""BYOL (Grill et al. 2020, arXiv 2006.07733), as the MoCo v3 paper ran it with ViT (arXiv 2104.02057, Table 4)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from trainers.heads import mlp
from trainers.losses import ByolLoss
from trainers.methods.momentum import ema_update_
from trainers.methods.views import encode_views, has_batchnorm, head_views


class BYOL(nn.Module):
    """Online network p = predictor(projector(backbone)), target network z = EMA of backbone + projector.

    The loss is L(p1, z2) + L(p2, z1) with L = 2 - 2 cos (paper eq. 2, symmetrised by summing). The target has no
    predictor and gets no gradient. Heads have BN in their hidden layers only (``last_bn=False``), as in BYOL.
    ``moco_m`` is the target decay rate tau (the trainer's cosine schedule from tau0 towards 1).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 256,
        mlp_dim: int = 4096,
        proj_layers: int = 2,
        pred_layers: int = 2,
        fuse_views: bool | None = None,
        view_chunk: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(proj_layers, backbone.num_features, mlp_dim, dim, last_bn=False)
        self.predictor = mlp(pred_layers, dim, mlp_dim, dim, last_bn=False)
        # Target copies start equal to the online network and are only ever changed by update_momentum.
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.criterion = ByolLoss()
        # Both views through the backbones together where that is exact (no BatchNorm inside): views.encode_views
        self.fuse_views = not has_batchnorm(backbone) if fuse_views is None else fuse_views
        self.view_chunk = view_chunk  # samples per fused backbone forward; None: views.encode_views decides

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """xi <- m * xi + (1 - m) * theta over backbone + projector parameters (see ``ema_update_``)."""
        ema_update_((self.backbone, self.projector), (self.target_backbone, self.target_projector), m)

    def forward(self, x1: Tensor, x2: Tensor, moco_m: float | None = None) -> tuple[Tensor, Tensor]:
        """Return (loss, features): features are view 1's backbone outputs (detached) for a kNN monitor.

        The target is updated first (with the current online weights), as MoCo v3 does for its momentum encoder,
        so that every method of the study follows one order. The heads' BatchNorms see the two views separately
        (per-view statistics, ``views.head_views``); the backbones too where they have BN (``fuse_views``).
        """
        if moco_m is not None:  # None: the caller did (as MoCoV3.forward says why)
            self.update_momentum(moco_m)
        h1, h2 = encode_views(self.backbone, x1, x2, self.fuse_views, self.view_chunk)
        p1, p2 = head_views((self.projector, self.predictor), h1, h2)
        with torch.no_grad():
            g1, g2 = encode_views(self.target_backbone, x1, x2, self.fuse_views, self.view_chunk)
            z1, z2 = head_views((self.target_projector,), g1, g2)
        loss = self.criterion(p1, z2) + self.criterion(p2, z1)
        return loss, h1.detach()
