"""MoCo v3 contrastive loss (InfoNCE with the global batch's keys as negatives)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.distributed import concat_all_gather, rank
from trainers.losses.precision import at_least_fp32


class CtrLoss(nn.Module):
    """ctr(q, k) = -log( exp(q·k+ / T) / sum_k exp(q·k / T) ), paper eq. (1), times 2T.

    As in the official ``contrastive_loss``: q and k are L2-normalised, k is gathered from all workers without
    gradient, logits are [N_local, N_global] and the positive of local row i is global column
    i + N_local * rank. The 2T factor (paper Algorithm 1 note) makes the gradient scale independent of T.
    Computed in fp32 under autocast: bf16 holds a logit near 1 / 0.2 = 5 only in steps of 0.03, as
    large as the gaps between hard negatives, and the [N, N] product costs little next to the backbone.
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        self.temperature = temperature

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        q = F.normalize(at_least_fp32(q), dim=1)
        k = concat_all_gather(F.normalize(at_least_fp32(k), dim=1))
        logits = q @ k.T / self.temperature
        n = logits.shape[0]
        labels = torch.arange(n, device=logits.device) + n * rank()
        return F.cross_entropy(logits, labels) * (2 * self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
