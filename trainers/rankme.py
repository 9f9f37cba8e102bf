"""RankMe: the effective rank of a set of embeddings, a label-free measure of representation quality.

Garrido, Balestriero, Najman, LeCun, "RankMe: Assessing the downstream performance of pretrained
self-supervised representations by their rank" (ICML 2023), eq. 1: with the singular values sigma_k of the
N x D embedding matrix,

    p_k = sigma_k / ||sigma||_1 + eps,    RankMe = exp(-sum_k p_k log p_k),

between 1 (every embedding on one line: collapse) and min(N, D). The paper finds it tracks linear-probe
accuracy across hyperparameters of one method without a label; ssl-study measures it every epoch on the
features of the kNN bank, which the loop extracts anyway.
"""

from __future__ import annotations

import torch

EPS = 1e-7  # the paper's epsilon


@torch.no_grad()
def rankme(embeddings: torch.Tensor, eps: float = EPS) -> float:
    """RankMe of ``embeddings`` [N, D] (eq. 1); NaN when they are not finite."""
    z = embeddings.double()
    if not torch.isfinite(z).all():
        return float("nan")
    sigma = torch.linalg.svdvals(z)
    p = sigma / sigma.sum().clamp_min(torch.finfo(z.dtype).tiny) + eps
    return float(torch.exp(-(p * p.log()).sum()))
