"""An online encoder and its momentum twin (MoCo v3's momentum encoder, BYOL's target), and the EMA between them."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from trainers.methods.views import encode_views, has_batchnorm, head_views


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


class MomentumPair(nn.Module):
    """Online q = predictor(projector(backbone)) against momentum k = EMA of backbone + projector (no predictor,
    no gradient); the loss is criterion(q1, k2) + criterion(q2, k1), summed over the two views.

    MoCo v3 (Algorithm 1, ``CtrLoss``) and BYOL (eq. 2, ``ByolLoss``) are this structure with their own heads and
    criterion, so both save the same keys (``momentum_backbone``, ``momentum_projector``), as in lightly's
    ``update_momentum`` pair and the official builder.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module, criterion: nn.Module, *,
                 fuse_views: bool | None = None, view_chunk: int | None = None) -> None:
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor
        # Momentum copies start equal to the online ones and are only ever changed by update_momentum.
        self.momentum_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(projector).requires_grad_(False)
        self.criterion = criterion
        # Both views through the backbones together where that is exact (no BatchNorm inside): views.encode_views
        self.fuse_views = not has_batchnorm(backbone) if fuse_views is None else fuse_views
        self.view_chunk = view_chunk  # samples per fused backbone forward; None: views.encode_views decides

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """p_m <- m * p_m + (1 - m) * p over backbone + projector parameters (see ``ema_update_``)."""
        ema_update_((self.backbone, self.projector), (self.momentum_backbone, self.momentum_projector), m)

    def forward(self, x1: Tensor, x2: Tensor, moco_m: float | None = None) -> tuple[Tensor, Tensor]:
        """Return (loss, features): features are view 1's backbone outputs (detached) for a kNN monitor.

        The momentum encoder is updated first, with this step's online weights, as the official MoCo v3 code does
        (BYOL follows the same order, so every method of a study does). ``moco_m`` None: the caller did (the
        Trainer, outside a compiled forward, where a float changing every step would make torch.compile recompile
        every step). The heads' BatchNorms see the two views separately, so that their statistics are per view
        (``views.head_views``); the backbones too where they have BN (``fuse_views``).
        """
        if moco_m is not None:
            self.update_momentum(moco_m)
        h1, h2 = encode_views(self.backbone, x1, x2, self.fuse_views, self.view_chunk)
        q1, q2 = head_views((self.projector, self.predictor), h1, h2)
        with torch.no_grad():
            g1, g2 = encode_views(self.momentum_backbone, x1, x2, self.fuse_views, self.view_chunk)
            k1, k2 = head_views((self.momentum_projector,), g1, g2)
        loss = self.criterion(q1, k2) + self.criterion(q2, k1)
        return loss, h1.detach()
