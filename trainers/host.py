"""The training process's host memory: keep what a step frees for the next step (CPU training, glibc).

A CPU step allocates and frees its activations every step. glibc hands every block above its mmap threshold
(at most 32 MiB, adjusted as blocks are freed) back to the kernel on free, and trims the heap's top once 2x
that is free, so the next step touches fresh pages again: 808,000 page faults in an official MoCo v3 step at
depth 4 / batch 256 (ViT dim 192), 1.5 of its 6.1 CPU seconds in the kernel; 3,900 with both thresholds raised,
which keeps the pages in the process. Measured on 2 cores of a Xeon (`bench/trainer.py --official`, a process
per contestant), the official step then ran at 1.37x its images/s at depth 4 / batch 256 and 1.16x at depth
12 / batch 64, ours at 1.17x and 1.05-1.13x (its chunked views allocate less per forward). Not every fault
goes: PyTorch allocates with ``posix_memalign``, which asks for a block plus its alignment, so a freed block of
exactly that size is not reused and the heap grows past it (strace) until freed neighbours merge. The cost:
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
