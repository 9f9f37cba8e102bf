"""RandomApply(Solarize(solarize_threshold), solarize_p)."""

from __future__ import annotations

import numpy as np
from numba import prange

from data.ops import COLUMNS
from data.ops.base import applies, kernel, name_kernels, parallel, sample_key

_ON = COLUMNS["solarize"]


def args(r) -> tuple | None:
    return (float(r.solarize_p), int(r.solarize_threshold)) if r.solarize_p > 0 else None


@kernel
def solarize(img, threshold):
    """v2.functional.solarize: values >= threshold become 255 - value."""
    flat = img.reshape(-1)
    for i in range(flat.size):
        flat[i] = np.uint8(255) - flat[i] if flat[i] >= threshold else flat[i]


@parallel
def batch(images, view, indices, base, salt_, p, threshold):
    for n in prange(images.shape[0]):
        if applies(sample_key(base, indices[n], salt_), p):
            solarize(images[n, view], threshold)


@kernel
def record(rows, indices, base, salt_, side, p, threshold):
    for n in range(rows.shape[0]):
        rows[n, _ON] = applies(sample_key(base, indices[n], salt_), p)


name_kernels(globals())
