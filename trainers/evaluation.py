"""The per-epoch evaluation of a backbone: weighted kNN top-1 on the eval split and RankMe of the bank."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed
from torch import Tensor, nn

from trainers import distributed as dist
from trainers.knn import knn_predict_ks
from trainers.rankme import rankme


@torch.no_grad()
def extract(backbone: nn.Module, loader, gather: bool = True, autocast=None) -> tuple[Tensor, Tensor]:
    """Backbone features (float32) and labels of a loader's shard; with ``gather``, those of every worker.
    ``autocast``: the training's autocast context (bf16 on GPU halves the forward's cost)."""
    feats, labels = [], []
    for images, y in loader:
        with autocast or contextlib.nullcontext():
            feats.append(backbone(images).float())
        labels.append(y.clone())  # FFCV reuses its batch buffers
    feats, labels = torch.cat(feats), torch.cat(labels)
    return (dist.gather_uneven(feats), dist.gather_uneven(labels)) if gather else (feats, labels)


def evaluate(backbone: nn.Module, bank_loader, test_loader, num_classes: int, *, k: int = 20,
             temperature: float = 0.07, autocast=None) -> dict:
    """Weighted kNN top-1 of the test images against the bank (``knn_top1`` at ``k``, ``knn_top1_k200`` at
    k = 200) and the label-free ``rankme`` of the bank's features (trainers/rankme.py).

    Every worker holds the whole bank but classifies only its own shard of the test images; the correct counts
    are summed over workers (the similarity is computed once in all, not once per worker).
    """
    was_training = backbone.training
    backbone.eval()
    bank, bank_labels = extract(backbone, bank_loader, autocast=autocast)
    feats, labels = extract(backbone, test_loader, gather=False, autocast=autocast)
    backbone.train(was_training)
    ks = {"knn_top1": min(k, len(bank)), "knn_top1_k200": min(200, len(bank))}
    preds = knn_predict_ks(feats, bank, bank_labels, num_classes, list(ks.values()), temperature=temperature)
    counts = torch.tensor([*((preds[kk] == labels).sum().item() for kk in ks.values()), len(labels)],
                          dtype=torch.float64, device=feats.device)
    if dist.world_size() > 1:
        torch.distributed.all_reduce(counts)
    return {"rankme": rankme(bank), **{key: (counts[i] / counts[-1]).item() for i, key in enumerate(ks)}}
