"""MoCo v3 (Chen, Xie, He 2021, arXiv 2104.02057; Algorithm 1 and the official ``moco/builder.py``)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from trainers.heads import mlp
from trainers.losses import CtrLoss


class MoCoV3(nn.Module):
    """Base encoder f_q = predictor(projector(backbone)), momentum encoder f_k = EMA of backbone + projector.

    The loss is ctr(q1, k2) + ctr(q2, k1) (summed, Algorithm 1). No queue: the negatives are the other keys
    of the global batch. Heads follow the ViT recipe (3-layer projector, 2-layer predictor, both last BN).
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
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(proj_layers, backbone.num_features, mlp_dim, dim, last_bn=True)
        self.predictor = mlp(pred_layers, dim, mlp_dim, dim, last_bn=True)
        # Momentum copies start equal to the base and are only ever changed by update_momentum.
        self.momentum_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.criterion = CtrLoss(temperature)

    def _pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        """Trainable base parameters of backbone + projector and their momentum twins."""
        base = [*self.backbone.parameters(), *self.projector.parameters()]
        momentum = [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]
        pairs = [(p, pm) for p, pm in zip(base, momentum, strict=True) if p.requires_grad]
        return [p for p, _ in pairs], [pm for _, pm in pairs]

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """p_m <- m * p_m + (1 - m) * p over backbone + projector parameters.

        Parameters only, as in the official ``_update_momentum_encoder``: the momentum BN running statistics
        are its own (updated by its forward passes in train mode), not an EMA of the base's.
        Frozen base parameters (sin-cos embedding, stop-grad patch projection) are skipped: they equal their
        twins, as an exact EMA would keep them, whereas m * x + (1 - m) * x in float32 drifts by rounding
        (~1e-4 after 20k steps).
        """
        base, momentum = self._pairs()
        torch._foreach_mul_(momentum, m)  # one fused kernel per dtype/device instead of two per tensor
        torch._foreach_add_(momentum, base, alpha=1.0 - m)

    def forward(self, x1: Tensor, x2: Tensor, moco_m: float) -> tuple[Tensor, Tensor]:
        """Return (loss, features): features are view 1's backbone outputs (detached) for a kNN monitor.

        The two views pass separately so that BN statistics are per view (as in the official code).
        """
        # The official code updates the momentum encoder before computing the keys (same step's base weights).
        self.update_momentum(moco_m)
        h1 = self.backbone(x1)
        q1 = self.predictor(self.projector(h1))
        q2 = self.predictor(self.projector(self.backbone(x2)))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(x1))
            k2 = self.momentum_projector(self.momentum_backbone(x2))
        loss = self.criterion(q1, k2) + self.criterion(q2, k1)
        return loss, h1.detach()
