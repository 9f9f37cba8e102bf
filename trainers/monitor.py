"""Dense kNN monitor of pretraining (MoCo v3 paper, Sec. 4.1: how the instability "dips" were seen).

The authors never released it; this follows the paper's description (recipe.md, "Instability"): every few
tens of iterations, the class tokens the method already computed for the current batch of *augmented training*
images are classified by a weighted kNN against a FIFO memory bank (about 10% of the training set) of earlier
batches' class tokens and labels. No extra forward pass and no eval loader, so it can run every few steps;
once-per-epoch evaluation hides the dips.

The bank holds features from slightly older versions of the model (like a MoCo v1 queue): a quickly changing
model reads lower than a frozen one, which is part of what the monitor shows.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor

from trainers import distributed as dist
from trainers.knn import knn_predict


class DenseKnnMonitor:
    """FIFO bank of (L2-normalised feature, label) pairs and a kNN top-1 measured every ``every`` steps.

    Call :meth:`update` on every training step with the batch's (detached) class tokens and labels, on every
    rank (it all-gathers; equal batch sizes per rank). On steps with ``step % every == 0`` and once the bank
    holds at least ``k`` entries it classifies the *local* batch against the bank as it was before this batch
    was added (so an image is never its own neighbour), sums the correct counts over ranks and returns the
    global top-1 (the same number on every rank). Then the gathered global batch is enqueued, replacing the
    oldest entries once ``bank_size`` is reached, so every rank holds the same bank.

    The bank is one preallocated float32 [bank_size, D] tensor on the features' device (allocated at the first
    update, when D is known); 10% of ImageNet with ViT-B is 128k x 768 x 4 B = 393 MB. Rows of the batch
    that are not finite (a diverged run) count as wrong.
    """

    def __init__(self, bank_size: int, num_classes: int, every: int, k: int = 20, temperature: float = 0.07):
        if bank_size < 1 or num_classes < 1 or every < 1 or k < 1:
            raise ValueError(f"bank_size, num_classes, every and k must be positive, got "
                             f"{bank_size}, {num_classes}, {every}, {k}")
        if k > bank_size:
            raise ValueError(f"k ({k}) cannot exceed bank_size ({bank_size}): the monitor would never measure")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.bank_size, self.num_classes, self.every = bank_size, num_classes, every
        self.k, self.temperature = k, temperature
        self.bank: Tensor | None = None  # [bank_size, D] float32, L2-normalised rows
        self.bank_labels: Tensor | None = None  # [bank_size] int64, -1 where empty
        self.ptr = 0  # next row to write
        self.filled = 0  # rows holding data (<= bank_size)
        self.history: list[tuple[int, float]] = []

    # ------------------------------------------------------------------------------------------------ bank

    def _allocate(self, dim: int, device: torch.device) -> None:
        self.bank = torch.zeros(self.bank_size, dim, dtype=torch.float32, device=device)
        self.bank_labels = torch.full((self.bank_size,), -1, dtype=torch.long, device=device)
        self.ptr = self.filled = 0

    def _enqueue(self, feats: Tensor, labels: Tensor) -> None:
        """Write rows at ``ptr`` with wrap-around; a batch larger than the bank keeps only its last rows."""
        assert self.bank is not None and self.bank_labels is not None
        n = feats.shape[0]
        if n >= self.bank_size:
            feats, labels, n = feats[-self.bank_size:], labels[-self.bank_size:], self.bank_size
        first = min(n, self.bank_size - self.ptr)
        self.bank[self.ptr:self.ptr + first] = feats[:first]
        self.bank_labels[self.ptr:self.ptr + first] = labels[:first]
        if first < n:  # wrap to the start
            self.bank[:n - first] = feats[first:]
            self.bank_labels[:n - first] = labels[first:]
        self.ptr = (self.ptr + n) % self.bank_size
        self.filled = min(self.bank_size, self.filled + n)

    def contents(self) -> tuple[Tensor, Tensor]:
        """The filled part of the bank, oldest first: (features [filled, D], labels [filled])."""
        if self.bank is None or self.bank_labels is None:
            return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
        start = self.ptr if self.filled == self.bank_size else 0
        order = (torch.arange(self.filled, device=self.bank.device) + start) % self.bank_size
        return self.bank[order], self.bank_labels[order]

    # ------------------------------------------------------------------------------------------------ update

    @torch.no_grad()
    def update(self, step: int, features: Tensor, labels: Tensor) -> float | None:
        """Measure (on due steps, once the bank holds ``k`` entries), then enqueue; returns top-1 or None."""
        if features.ndim != 2 or labels.shape != (features.shape[0],):
            raise ValueError(f"expected features [B, D] and labels [B], got {tuple(features.shape)} and "
                             f"{tuple(labels.shape)}")
        feats = F.normalize(features.detach().float(), dim=1)  # a new tensor: the caller's is never aliased
        labels = labels.detach().to(device=feats.device, dtype=torch.long)
        if self.bank is None:
            self._allocate(feats.shape[1], feats.device)
        elif self.bank.shape[1] != feats.shape[1]:
            raise ValueError(f"feature dim {feats.shape[1]} does not match the bank's {self.bank.shape[1]}")
        elif self.bank.device != feats.device:  # e.g. loaded from a CPU checkpoint
            self.bank, self.bank_labels = self.bank.to(feats.device), self.bank_labels.to(feats.device)

        acc = None
        if step % self.every == 0 and self.filled >= self.k:
            bank, bank_labels = self.bank[:self.filled], self.bank_labels[:self.filled]
            pred = knn_predict(feats, bank, bank_labels, self.num_classes, k=self.k, temperature=self.temperature)
            correct = (pred == labels) & feats.isfinite().all(dim=1)
            counts = torch.stack([correct.sum(), torch.tensor(len(labels), device=feats.device)]).double()
            if dist.world_size() > 1:
                torch_dist.all_reduce(counts)
            acc = (counts[0] / counts[1]).item()
            self.history.append((step, acc))

        self._enqueue(dist.concat_all_gather(feats), dist.concat_all_gather(labels))
        return acc

    # ------------------------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {
            "bank_size": self.bank_size, "num_classes": self.num_classes, "every": self.every, "k": self.k,
            "temperature": self.temperature, "ptr": self.ptr, "filled": self.filled,
            "bank": None if self.bank is None else self.bank.clone(),
            "bank_labels": None if self.bank_labels is None else self.bank_labels.clone(),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the bank and history of a :meth:`state_dict`.

        bank_size and num_classes must match; ``every``, ``k`` and ``temperature`` stay this monitor's own (they
        decide only how the bank is read).
        """
        for key in ("bank_size", "num_classes"):
            if state[key] != getattr(self, key):
                raise ValueError(f"checkpoint has {key}={state[key]}, this monitor {getattr(self, key)}")
        self.ptr, self.filled = state["ptr"], state["filled"]
        self.bank = None if state["bank"] is None else state["bank"].clone()
        self.bank_labels = None if state["bank_labels"] is None else state["bank_labels"].clone()
        self.history = [(int(s), float(a)) for s, a in state["history"]]
