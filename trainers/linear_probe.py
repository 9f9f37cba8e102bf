"""Linear probe: the paper's evaluation protocol (official MoCo v3 ``main_lincls.py``), plus an online probe.

Protocol (recipe.md, "Linear probe"): the backbone is frozen and in eval mode for the whole run, so BatchNorm
statistics do not move either; a check at the end compares every weight and buffer with a copy taken at the
start. Only a Linear head (normal(0, 0.01) weights, zero bias, no BN before it) is trained, with SGD momentum
0.9, weight decay 0, lr = base_lr * batch / 256 (base 3 for ViT, 0.1 for ResNet), cosine per epoch, no warmup.
Train views are RandomResizedCrop + flip; the test set is centre-cropped.

``linear_probe`` runs in one process (the offline use) or under torch.distributed: then ``batch_size`` is the
global batch, each rank trains on its FFCV shard with head gradients averaged over ranks (so the heads stay
identical), and each rank evaluates a disjoint slice of the test set with the correct counts summed, so every
test image counts exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn

from data.recipes import ViewRecipe
from trainers import distributed as dist
from trainers.schedules import scaled_lr

Batches = Iterable[tuple[Tensor, Tensor]]


# ---------------------------------------------------------------------------------------------- frozen guard


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """A CPU copy of every parameter and buffer of ``module`` (non-persistent buffers included)."""
    tensors = dict(module.state_dict())
    for name, buf in module.named_buffers():
        tensors.setdefault(name, buf)
    return {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}


def _bit_equal(a: Tensor, b: Tensor) -> bool:
    """Same dtype, shape and bytes (so NaN == NaN, and -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def check_unchanged(module: nn.Module, before: dict[str, Tensor]) -> None:
    """Raise RuntimeError naming every parameter or buffer of ``module`` that differs from ``before``."""
    after = snapshot(module)
    changed = sorted(set(before) ^ set(after))
    changed += [name for name in sorted(set(before) & set(after)) if not _bit_equal(before[name], after[name])]
    if changed:
        shown = ", ".join(changed[:10]) + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
        raise RuntimeError(f"the frozen backbone changed during the linear probe: {shown}")


def check_eval_mode(module: nn.Module) -> None:
    """Raise RuntimeError if any submodule is in training mode (BatchNorm would update its statistics)."""
    training = [name or "<root>" for name, m in module.named_modules() if m.training]
    if training:
        raise RuntimeError(f"the frozen backbone must stay in eval mode, but these modules are training: "
                           f"{', '.join(training[:10])}")


# ---------------------------------------------------------------------------------------------- head


def init_head_(head: nn.Linear, generator: torch.Generator | None = None) -> nn.Linear:
    """Official lincls init: weight normal(0, 0.01), bias zero."""
    with torch.no_grad():
        nn.init.normal_(head.weight, 0.0, 0.01, generator=generator)
        nn.init.zeros_(head.bias)
    return head


def _average_gradients(module: nn.Module) -> None:
    """Mean of the gradients over torch.distributed ranks (identity in one process)."""
    world = dist.world_size()
    if world == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            torch_dist.all_reduce(p.grad)
            p.grad.div_(world)


def _sum_over_ranks(*values: float | Tensor, device: torch.device) -> list[float]:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.world_size() > 1:
        torch_dist.all_reduce(t)
    return t.tolist()


def cosine_epoch_lr(epoch: int, epochs: int, peak: float) -> float:
    """Official lincls ``adjust_learning_rate``: peak * 0.5 * (1 + cos(pi * epoch / epochs)), set per epoch."""
    return peak * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


@torch.no_grad()
def _features(backbone: nn.Module, x: Tensor) -> Tensor:
    return backbone(x).float()


def train_linear_head(
    backbone: nn.Module,
    train_batches: Batches,
    test_batches: Batches,
    *,
    num_features: int,
    num_classes: int,
    epochs: int,
    lr: float,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    """The probe on any re-iterable ``(images, labels)`` batches (an FFCV loader, a list of tensors).

    ``lr`` is the peak (already scaled) learning rate. Under torch.distributed ``train_batches`` is this rank's
    shard with the same number of batches on every rank, and ``test_batches`` a disjoint slice of the test
    set. The backbone is moved to ``device`` in place, put in eval mode with requires_grad False for the run and
    restored afterwards (modes and flags); it is checked unchanged at the end (RuntimeError otherwise).
    Returns ``{"top1", "top5" (the label among the 5 highest logits; every image with 5 classes or fewer),
    "train_loss" (mean over the last epoch), "epochs"}``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be positive, got {epochs}")
    device = torch.device(device)
    backbone.to(device)
    modes = {m: m.training for m in backbone.modules()}
    grads = {p: p.requires_grad for p in backbone.parameters()}
    before = snapshot(backbone)
    try:
        backbone.eval()
        backbone.requires_grad_(False)

        head = init_head_(nn.Linear(num_features, num_classes), torch.Generator().manual_seed(seed)).to(device)
        optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        loss_sum = seen = 0.0
        for epoch in range(epochs):
            for group in optimizer.param_groups:
                group["lr"] = cosine_epoch_lr(epoch, epochs, lr)
            check_eval_mode(backbone)
            losses, seen = torch.zeros((), dtype=torch.float64, device=device), 0
            for x, y in train_batches:
                feats = _features(backbone, x.to(device, non_blocking=True))
                y = y.to(device, non_blocking=True)
                loss = F.cross_entropy(head(feats), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                _average_gradients(head)
                optimizer.step()
                losses += loss.detach().double() * len(y)
                seen += len(y)
            if seen == 0:
                raise ValueError("the training batches are empty")
            loss_sum = losses.item()
        check_eval_mode(backbone)
        loss_sum, seen = _sum_over_ranks(loss_sum, seen, device=device)

        correct, total = torch.zeros(2, dtype=torch.long, device=device), 0
        with torch.no_grad():
            for x, y in test_batches:
                logits = head(_features(backbone, x.to(device, non_blocking=True)))
                hits = logits.topk(min(5, num_classes), dim=1).indices == y.to(device)[:, None]
                correct += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
                total += len(y)
        top1, top5, total = _sum_over_ranks(*correct.tolist(), total, device=device)
        if total == 0:
            raise ValueError("the test batches are empty")
        check_unchanged(backbone, before)
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in grads.items():
            p.requires_grad_(flag)
    return {"top1": top1 / total, "top5": top5 / total, "train_loss": loss_sum / seen, "epochs": epochs}


@torch.no_grad()
def _num_features(backbone: nn.Module, resolution: int, device: torch.device) -> int:
    """``backbone.num_features`` (timm), or the width of an eval-mode forward of two black images."""
    n = getattr(backbone, "num_features", None)
    if isinstance(n, int):
        return n
    was = {m: m.training for m in backbone.modules()}
    backbone.eval()
    try:
        return backbone(torch.zeros(2, 3, resolution, resolution, device=device)).shape[1]
    finally:
        for m, mode in was.items():
            m.training = mode


def linear_probe(
    backbone: nn.Module,
    train_path: Path,
    test_path: Path,
    *,
    epochs: int = 90,
    batch_size: int = 1024,
    base_lr: float = 3.0,
    num_workers: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    train_indices: Sequence[int] | None = None,
    test_indices: Sequence[int] | None = None,
) -> dict:
    """Linear-probe top-1 of a frozen ``backbone`` (``[B, 3, R, R] -> [B, D]``) on FFCV files (paper protocol).

    ``batch_size`` is global (divided among torch.distributed ranks, if any) and lr = base_lr * batch_size /
    256; ``base_lr`` is 3.0 for ViT, 0.1 for ResNet. Train batches are one RandomResizedCrop(0.08, 1) + flip
    view per image (the last short batch is kept), the test set is centre-cropped (eval_loader defaults).
    ``*_indices`` restrict either file to a subset. Returns ``{"top1", "top5", "train_loss", "epochs"}``; raises
    RuntimeError if any backbone weight or buffer changed. Builds two FFCV loaders (numba compiles each on its
    first batch, tens of seconds on a small CPU).
    """
    train_path, test_path = Path(train_path), Path(test_path)
    from data.convert import read_metadata  # FFCV: imported here, so the online probe needs none
    from data.loaders import eval_loader, ssl_loader

    meta, test_meta = read_metadata(train_path), read_metadata(test_path)
    if list(meta["classes"]) != list(test_meta["classes"]):
        raise ValueError(f"{train_path} and {test_path} have different classes")
    world, rank = dist.world_size(), dist.rank()
    if batch_size < world or batch_size % world:
        raise ValueError(f"batch_size {batch_size} does not divide among {world} ranks")
    device = torch.device(device)
    local_batch = batch_size // world

    train_loader = ssl_loader(train_path, batch_size=local_batch, views=(ViewRecipe(),), num_workers=num_workers,
                              seed=seed, distributed=world > 1, indices=train_indices, device=device,
                              drop_last=False)
    test_loader: Batches = []
    if world == 1:
        test_loader = eval_loader(test_path, batch_size=local_batch, num_workers=num_workers,
                                  indices=test_indices, device=device)
    else:
        # A disjoint slice per rank without the padding of torch's DistributedSampler: each image counts once.
        every = np.arange(test_meta["count"]) if test_indices is None else np.asarray(test_indices)
        shard = every[rank::world].tolist()
        if shard:
            test_loader = eval_loader(test_path, batch_size=local_batch, num_workers=num_workers, indices=shard,
                                      device=device)

    backbone.to(device)
    return train_linear_head(
        backbone, train_loader, test_loader, num_features=_num_features(backbone, meta["resolution"], device),
        num_classes=meta["num_classes"], epochs=epochs, lr=scaled_lr(base_lr, batch_size), seed=seed,
        device=device,
    )


# ---------------------------------------------------------------------------------------------- online probe


class OnlineLinearProbe(nn.Module):
    """A Linear head trained during pretraining on detached features, with its own SGD optimiser.

    It never sends gradient into the backbone. Under torch.distributed, :meth:`step` averages the head's
    gradients and :meth:`accuracy` sums the counts over ranks, so both must be called on every rank.
    Checkpoint ``probe.state_dict()`` and ``probe.optimizer.state_dict()``.
    """

    def __init__(self, num_features: int, num_classes: int, *, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        self.head = init_head_(nn.Linear(num_features, num_classes))
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=lr, momentum=momentum,
                                         weight_decay=weight_decay)

    def forward(self, features: Tensor) -> Tensor:
        return self.head(features.detach().float())

    def step(self, features: Tensor, labels: Tensor) -> float:
        """One SGD step of cross-entropy on ``features`` (detached, float32); returns the loss."""
        device = self.head.weight.device
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            loss = F.cross_entropy(self(features.to(device)), labels.to(device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        _average_gradients(self.head)
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def accuracy(self, features: Tensor, labels: Tensor) -> float:
        device = self.head.weight.device
        pred = self(features.to(device)).argmax(dim=1)
        correct, total = _sum_over_ranks((pred == labels.to(device)).sum().item(), len(labels), device=device)
        return correct / total
