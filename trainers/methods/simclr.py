"""SimCLR (Chen et al. 2020, arXiv 2002.05709), as the MoCo v3 paper ran it with ViT (arXiv 2104.02057, Table 4)."""

from __future__ import annotations

from torch import Tensor, nn

from trainers.heads import mlp
from trainers.losses import NTXentLoss
from trainers.methods.views import encode_views, has_batchnorm, head_views


class SimCLR(nn.Module):
    """z = projector(backbone(x)) for both views, NT-Xent over the 2N views of the global batch.

    No predictor and no momentum encoder: both views go through the same trained network, and the negatives
    (gathered with gradient) are the other 2N - 2 views of the global batch.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 256,
        mlp_dim: int = 4096,
        temperature: float = 0.1,
        proj_layers: int = 2,
        fuse_views: bool | None = None,
        view_chunk: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        # Last BN on: the official SimCLR code (google-research/simclr ``model_util.projection_head``) puts BN after
        # every layer of its projection head, the output layer included (no centring there; here affine-free, as in
        # MoCo v3's heads, which took their last BN from SimCLR). The recipe's "projector MLP with BN" does not
        # exclude the last layer, so we follow SimCLR's own head.
        self.projector = mlp(proj_layers, backbone.num_features, mlp_dim, dim, last_bn=True)
        self.criterion = NTXentLoss(temperature)
        # Both views through the backbone together where that is exact (no BatchNorm inside): views.encode_views
        self.fuse_views = not has_batchnorm(backbone) if fuse_views is None else fuse_views
        self.view_chunk = view_chunk  # samples per fused backbone forward; None: views.encode_views decides

    def forward(self, x1: Tensor, x2: Tensor, moco_m: float | None = None) -> tuple[Tensor, Tensor]:
        """Return (loss, features): features are view 1's backbone outputs (detached) for a kNN monitor.

        ``moco_m`` is accepted and ignored (SimCLR has no momentum encoder) so that every method shares the
        signature ``forward(x1, x2, moco_m)``. The projector's BatchNorms see the views separately
        (per-view statistics, ``views.head_views``); the backbone too where it has BN (``fuse_views``).
        """
        h1, h2 = encode_views(self.backbone, x1, x2, self.fuse_views, self.view_chunk)
        z1, z2 = head_views((self.projector,), h1, h2)
        return self.criterion(z1, z2), h1.detach()
