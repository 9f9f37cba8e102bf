"""The per-epoch evaluation of a backbone: weighted kNN top-1 on the eval split and RankMe of the bank."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainers import distributed as dist
from trainers.knn import knn_predict_ks
from trainers.rankme import rankme


@torch.no_grad()
def extract(backbone: nn.Module, loader) -> tuple[Tensor, Tensor]:
    """Backbone features and labels of a loader's shard, gathered from every worker."""
    feats, labels = [], []
    for images, y in loader:
        feats.append(backbone(images).float())
        labels.append(y.clone())  # FFCV reuses its batch buffers
    return dist.gather_uneven(torch.cat(feats)), dist.gather_uneven(torch.cat(labels))


def evaluate(backbone: nn.Module, bank_loader, test_loader, num_classes: int, *, k: int = 20,
             temperature: float = 0.07) -> dict:
    """Weighted kNN top-1 of the test images against the bank (``knn_top1`` at ``k``, ``knn_top1_k200`` at
    k = 200) and the label-free ``rankme`` of the bank's features (trainers/rankme.py)."""
    was_training = backbone.training
    backbone.eval()
    bank, bank_labels = extract(backbone, bank_loader)
    feats, labels = extract(backbone, test_loader)
    backbone.train(was_training)
    ks = {"knn_top1": min(k, len(bank)), "knn_top1_k200": min(200, len(bank))}
    preds = knn_predict_ks(feats, bank, bank_labels, num_classes, list(ks.values()), temperature=temperature)
    return {"rankme": rankme(bank), **{key: (preds[kk] == labels).float().mean().item() for key, kk in ks.items()}}
