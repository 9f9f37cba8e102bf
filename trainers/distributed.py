"""Collectives that degrade to the identity on one process (tests, single-worker runs)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


@torch.no_grad()
def concat_all_gather(t: Tensor) -> Tensor:
    """All-gather along dim 0 without gradient (official MoCo ``concat_all_gather``). Equal sizes per rank."""
    if world_size() == 1:
        return t.detach()  # same values; detached so that one process behaves like many
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def all_gather_with_grad(t: Tensor) -> Tensor:
    """All-gather along dim 0 keeping the graph. Equal sizes per rank.

    Backward sums over ranks the gradients that each rank's loss sends to a slice and returns to each rank the
    sum for its own slice (a reduce-scatter).
    """
    if world_size() == 1:
        return t
    return torch.cat(dist_fn.all_gather(t), dim=0)


@torch.no_grad()
def gather_uneven(t: Tensor) -> Tensor:
    """All-gather along dim 0 when ranks hold different numbers of rows (pads to the largest, then trims)."""
    if world_size() == 1:
        return t.detach()
    sizes = concat_all_gather(torch.tensor([t.shape[0]], device=t.device)).tolist()
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    gathered = concat_all_gather(padded)
    return torch.cat([gathered[i * max(sizes): i * max(sizes) + n] for i, n in enumerate(sizes)])


def broadcast_object(obj, device: torch.device | None = None, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (a decision every rank must act on alike).

    ``device``: where the pickled bytes travel; NCCL needs this rank's GPU (default: the current CUDA device).
    """
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=device)
    return box[0]
