"""Weighted kNN classifier on features (Wu et al. 2018, InstDisc, eq. 7), for monitors and evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict_ks(
    features: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    ks: Sequence[int],
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[int, Tensor]:
    """Predicted labels [N] for each k of ``ks``: each of the top-k cosine neighbours votes exp(sim / T) for its
    class. One similarity and one top-k (of the largest k) serve every k: the top-k of a k' > k, sorted, starts
    with the top-k.

    Features are processed ``chunk_size`` rows at a time so that only a [chunk_size, M] similarity exists at
    once (a full 10k x 60k float32 matrix is 2.4 GB).
    """
    # float32 throughout: exp(1 / 0.07) ~ 1.6e6 overflows float16, and half-precision banks are likely.
    bank = F.normalize(bank.float(), dim=1)
    ks = [min(k, bank.shape[0]) for k in ks]
    preds: dict[int, list[Tensor]] = {k: [] for k in ks}
    for chunk in F.normalize(features.float(), dim=1).split(chunk_size):
        sim, idx = (chunk @ bank.T).topk(max(ks), dim=1)
        weights, votes = (sim / temperature).exp(), bank_labels[idx]
        for k in preds:
            scores = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
            scores.scatter_add_(1, votes[:, :k], weights[:, :k])
            preds[k].append(scores.argmax(dim=1))
    return {k: torch.cat(p) for k, p in preds.items()}


def knn_predict(
    features: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    """Predicted labels [N] of the weighted kNN at one ``k`` (:func:`knn_predict_ks`)."""
    k = min(k, bank.shape[0])
    return knn_predict_ks(features, bank, bank_labels, num_classes, [k], temperature, chunk_size)[k]


def knn_accuracy(
    features: Tensor,
    labels: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
    """Fraction of ``features`` whose weighted-kNN prediction against ``bank`` equals ``labels``."""
    preds = knn_predict(features, bank, bank_labels, num_classes, k, temperature, chunk_size)
    return (preds == labels.to(preds.device)).float().mean().item()
