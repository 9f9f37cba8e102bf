"""RandomGrayscale(grayscale_p): the truncated luma in all three channels."""

from __future__ import annotations

import numpy as np
from numba import prange

from data.ops import COLUMNS
from data.ops.base import applies, kernel, name_kernels, parallel, sample_key

_GR, _GG, _GB = np.float32(0.2989), np.float32(0.587), np.float32(0.114)
_ON = COLUMNS["gray"]


def args(r) -> tuple | None:
    return (float(r.grayscale_p),) if r.grayscale_p > 0 else None


@kernel
def luma(r, g, b):
    """v2's _rgb_to_grayscale_image in float32 (before any truncation)."""
    return np.float32(r) * _GR + np.float32(g) * _GG + np.float32(b) * _GB


@kernel
def to_grayscale(img):
    """v2.functional.rgb_to_grayscale(num_output_channels=3): truncated luma in all three channels."""
    flat = img.reshape(-1)
    for i in range(flat.size // 3):
        gray = np.uint8(luma(flat[3 * i], flat[3 * i + 1], flat[3 * i + 2]))
        flat[3 * i] = gray
        flat[3 * i + 1] = gray
        flat[3 * i + 2] = gray


@parallel
def batch(images, view, indices, base, salt_, p):
    for n in prange(images.shape[0]):
        if applies(sample_key(base, indices[n], salt_), p):
            to_grayscale(images[n, view])


@kernel
def record(rows, indices, base, salt_, side, p):
    for n in range(rows.shape[0]):
        rows[n, _ON] = applies(sample_key(base, indices[n], salt_), p)


name_kernels(globals())
