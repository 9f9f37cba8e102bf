"""The training process's host memory: keep what a step frees for the next step (CPU training, glibc).

A CPU step allocates and frees its activations every step, hundreds of MB (MoCo v3, ViT dim 192 / depth 12,
batch 64: about 1.5 GB). glibc hands every block above its mmap threshold (at most 32 MiB, adjusted as blocks
are freed) back to the kernel on free, and trims the heap's top once 2x that is free, so the next step touches
fresh pages again: 520,000 page faults in a step at depth 4 / batch 256, a third of the process's time in the
kernel. Raising both thresholds keeps the pages in the process: measured on 2 cores of a Xeon (one process,
`bench/trainer.py --official`), the official MoCo v3 step ran at 1.5x its images/s at depth 4 / batch 256 and
1.2x at depth 12 / batch 64, ours at 1.17x and 1.05x (its chunked views allocate less per forward). The cost:
the process keeps its peak heap after a step, which the next step needs anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
# Blocks up to 1 GiB come from the heap (a depth-4 / batch-256 activation is 51 MB); the heap is never trimmed
# (mallopt takes an int: 2 GiB - 1 is its largest value).
MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES = 1 << 30, 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory in the process; once per process (it cannot be undone).

    True where it took; False without glibc (macOS, musl), where the allocator is left as it is.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) & bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
