"""Both augmented views through one encoder, grouped as is fastest where that computes exactly the same thing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

FALLBACK_CACHE_BYTES = 32 * 2**20  # where sysfs cannot tell (not Linux): a server CPU's L3
# A large server L3 is shared by all the host's cores (480 MiB on a 2-vCPU slice of a Xeon with AMX): a chunk
# sized from all of it ran at 0.57x (depth 4) of one sized to 8 MiB (0.85x with freed memory kept,
# trainers/host.py), so the budget stops there.
CHUNK_BYTES_MAX = 8 * 2**20


def has_batchnorm(module: nn.Module) -> bool:
    """Whether any submodule normalises over the batch (BatchNorm, SyncBatchNorm, GlobalBatchNorm)."""
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def last_level_cache_bytes() -> int:
    """Size of this CPU's largest data cache (Linux sysfs: ``32768K``), or ``FALLBACK_CACHE_BYTES``."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() in ("Data", "Unified"):
                size = (index / "size").read_text().strip()
                sizes.append(int(size[:-1]) * {"K": 2**10, "M": 2**20}[size[-1]] if size[-1] in "KM" else int(size))
        except (OSError, ValueError):
            continue
    return max(sizes, default=FALLBACK_CACHE_BYTES)


LAST_LEVEL_CACHE_BYTES = last_level_cache_bytes()  # read once here, not in a forward torch.compile traces


def cpu_chunk(encoder: nn.Module) -> int | None:
    """Samples per forward of a ViT on CPU: as many as keep one block's MLP activations (tokens x MLP width x
    4 bytes per sample) within a fifth of the last-level cache and ``CHUNK_BYTES_MAX``; None for other encoders
    (one call).

    On CPU a ViT block's elementwise work (LayerNorm, GELU, residual adds, bias copies: a third of the step at
    dim 192) runs from cache when the chunk fits and from memory when it does not. Measured on 2 cores of a
    32 MiB-L3 EPYC (MoCo v3, dim 192, 65 tokens, MLP 768: 200 KB per sample): at depth 4 / batch 256, chunks of 32
    to 128 samples ran at 1.33-1.37x the images/s of one forward per view, which ran at 1.18x one forward over
    both; at depth 12 / batch 64, chunks of 32 ran at 1.13x one forward per view, and 16 were slower. On GPU one
    forward over both views stays fastest (bigger kernels), so chunks are for CPU only. On 2 cores of a Xeon
    with a 480 MiB L3, chunks of 40 (8 MiB) ran at 1.74x one forward over both views at depth 4 / batch 256 and
    1.13x and 1.34x at depth 12 / batch 64 in two runs; 24 to 64 were within 7% of 40. Those figures are with
    glibc's default allocator; with freed memory kept (trainers/host.py, as the Trainer sets on CPU), chunks
    of 40 ran at 1.18x one forward over both views at depth 4 and chunks of 43 at 1.07x at depth 12.
    """
    blocks, patch_embed = getattr(encoder, "blocks", None), getattr(encoder, "patch_embed", None)
    fc1 = getattr(getattr(blocks[0], "mlp", None), "fc1", None) if blocks else None
    if fc1 is None or getattr(patch_embed, "num_patches", None) is None:
        return None
    tokens = patch_embed.num_patches + getattr(encoder, "num_prefix_tokens", 1)
    budget = min(LAST_LEVEL_CACHE_BYTES // 5, CHUNK_BYTES_MAX)
    return max(1, budget // (tokens * fc1.out_features * 4))


def encode_views(encoder: nn.Module, x1: Tensor, x2: Tensor, fused: bool,
                 chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """``(encoder(x1), encoder(x2))``; ``fused``: the samples of both views regrouped, ``chunk`` per forward
    (None: all of them in one forward on GPU, ``cpu_chunk`` on CPU).

    Fuse only an encoder in which every sample is computed on its own (a LayerNorm ViT without dropout): the
    outputs are then the same up to fp32 rounding whatever the grouping. An encoder with BatchNorm (ViT-BN,
    ResNet) must see the views one at a time: its statistics are per view, as in the paper (the heads:
    ``head_views``).
    """
    if not fused:
        return encoder(x1), encoder(x2)
    x = torch.cat([x1, x2])
    chunk = chunk or (cpu_chunk(encoder) if x.device.type == "cpu" else None)
    h = encoder(x) if not chunk or chunk >= len(x) else torch.cat([encoder(c) for c in x.split(chunk)])
    h1, h2 = h.chunk(2)
    return h1, h2


def head_views(heads: Sequence[nn.Module], h1: Tensor, h2: Tensor) -> tuple[Tensor, Tensor]:
    """``(heads(h1), heads(h2))`` through the MLPs ``heads`` in turn: each layer once over both views' rows, but
    each BatchNorm once per view, so that its statistics (and running averages) are per view as in the paper.

    Exact up to fp32 rounding, and cheaper than a pass per view: one GEMM per Linear and one weight gradient
    with twice the rows, instead of two gradients and their sum (a 4096 x 4096 projector layer: a 64 MB sum
    per step). MoCo v3 at depth 12 / batch 64 on 2 CPU cores: 1.02x the images/s of a pass per view.
    """
    n, x = len(h1), torch.cat([h1, h2])
    for layer in (layer for head in heads for layer in head):
        x = torch.cat([layer(x[:n]), layer(x[n:])]) if isinstance(layer, _BatchNorm) else layer(x)
    x1, x2 = x.split(n)
    return x1, x2
