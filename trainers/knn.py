"""Weighted kNN classifier on features (Wu et al. 2018, InstDisc, eq. 7), for monitors and evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _class_scores(features: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, ks: Sequence[int],
                  temperature: float, chunk_size: int):
    """For each ``chunk_size`` rows of ``features``: the rows' slice and {k: class scores [rows, classes]}, each
    of the top-k cosine neighbours voting exp(sim / T) for its class. One similarity and one top-k (of the
    largest k) serve every k: the top-k of a k' > k, sorted, starts with the top-k."""
    # float32 throughout: exp(1 / 0.07) ~ 1.6e6 overflows float16, and half-precision banks are likely.
    bank = F.normalize(bank.float(), dim=1)
    ks = [min(k, bank.shape[0]) for k in ks]
    for start, chunk in zip(range(0, len(features), chunk_size),
                            F.normalize(features.float(), dim=1).split(chunk_size), strict=True):
        sim, idx = (chunk @ bank.T).topk(max(ks), dim=1)
        weights, votes = (sim / temperature).exp(), bank_labels[idx]
        scores = {}
        for k in dict.fromkeys(ks):
            scores[k] = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
            scores[k].scatter_add_(1, votes[:, :k], weights[:, :k])
        yield slice(start, start + len(chunk)), scores


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
    """Predicted labels [N] for each k of ``ks`` (capped at the bank's size): the class with the highest weighted
    vote (:func:`_class_scores`).

    Features are processed ``chunk_size`` rows at a time so that only a [chunk_size, M] similarity exists at
    once (a full 10k x 60k float32 matrix is 2.4 GB).
    """
    preds: dict[int, list[Tensor]] = {min(k, bank.shape[0]): [] for k in ks}
    for _, scores in _class_scores(features, bank, bank_labels, num_classes, ks, temperature, chunk_size):
        for k, s in scores.items():
            preds[k].append(s.argmax(dim=1))
    return {k: torch.cat(p) for k, p in preds.items()}


@torch.no_grad()
def knn_topk_correct(
    features: Tensor,
    labels: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    ks: Sequence[int],
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[int, tuple[int, int]]:
    """For each k of ``ks``: how many of ``features`` have their label as the top class of the weighted vote and
    how many among the top 5 classes (all of them with 5 classes or fewer); k is capped at the bank's size."""
    labels = labels.to(features.device)
    counts = {min(k, bank.shape[0]): [0, 0] for k in ks}
    for rows, scores in _class_scores(features, bank, bank_labels, num_classes, ks, temperature, chunk_size):
        for k, s in scores.items():
            counts[k][0] += int((s.argmax(dim=1) == labels[rows]).sum())  # as knn_predict_ks, ties included
            counts[k][1] += int((s.topk(min(5, num_classes), dim=1).indices == labels[rows, None]).any(dim=1).sum())
    return {k: (top1, top5) for k, (top1, top5) in counts.items()}


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
