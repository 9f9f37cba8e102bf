"""SimCLR's NT-Xent loss over the 2N views of the global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.distributed import all_gather_with_grad, rank
from trainers.losses.precision import at_least_fp32


class NTXentLoss(nn.Module):
    """l(i, j) = -log( exp(sim(z_i, z_j) / T) / sum_{k != i} exp(sim(z_i, z_k) / T) ), SimCLR paper eq. (1).

    Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations" (arXiv 2002.05709).
    sim is the cosine similarity. For each view the positive is the other view of the same image and the
    negatives are the other 2N - 2 views of the *global* batch (N images over all workers). z1 and z2 are
    L2-normalised and both views are gathered from every worker *with* gradient, so a worker's view also
    receives the gradient it gets as a negative in the other workers' rows. The loss is the cross-entropy
    averaged over the 2 * N_local local rows (the global mean is the mean over workers, which DDP takes).

    Layout: the local views ``[z1; z2]`` ([2n, d]) are gathered into [2N, d] with rank r's block at rows
    2n * r ... 2n * (r + 1); local row i's own column is 2n * r + i (masked with -inf) and its positive is
    2n * r + (i + n) mod 2n. No 2T factor (unlike MoCo v3's ctr).
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    @torch.autocast("cuda", enabled=False)  # fp32 logits, as CtrLoss says why
    @torch.autocast("cpu", enabled=False)
    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        if z1.shape != z2.shape:
            raise ValueError(f"the two views must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
        z = F.normalize(at_least_fp32(torch.cat([z1, z2])), dim=1)  # [2n, d]: local views 1 then 2
        z_all = all_gather_with_grad(z)  # [2N, d]
        logits = z @ z_all.T / self.temperature  # [2n, 2N]
        two_n = z.shape[0]
        rows = torch.arange(two_n, device=z.device)
        own = rows + two_n * rank()
        positive = (rows + two_n // 2) % two_n + two_n * rank()
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[rows, own] = True
        logits = logits.masked_fill(self_mask, float("-inf"))
        return F.cross_entropy(logits, positive)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
