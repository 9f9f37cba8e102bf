"""BYOL regression loss (normalised mean squared error between prediction and target projection)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ByolLoss(nn.Module):
    """L(p, z) = ||p/||p|| - z/||z|| ||^2 = 2 - 2 * cos(p, z), averaged over the batch (BYOL paper eq. 2).

    Grill et al., "Bootstrap Your Own Latent" (arXiv 2006.07733). ``p`` is the online prediction, ``z`` the
    target projection: the caller passes ``z`` without a graph (the stop-gradient of the paper), this module does
    not detach it. The symmetrised BYOL loss is L(p1, z2) + L(p2, z1) (summed), formed by the method.
    """

    def forward(self, p: Tensor, z: Tensor) -> Tensor:
        p = F.normalize(p, dim=1)
        z = F.normalize(z, dim=1)
        return (2 - 2 * (p * z).sum(dim=1)).mean()
