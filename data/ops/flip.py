"""RandomHorizontalFlip(flip_p). Runs on the host only: the device gets its views flipped."""

from __future__ import annotations

from numba import prange

from data.ops.base import applies, kernel, name_kernels, parallel, sample_key


def args(r) -> tuple | None:
    return (float(r.flip_p),) if r.flip_p > 0 else None


@kernel
def hflip(img):
    """Mirror the columns (v2.functional.horizontal_flip)."""
    w = img.shape[1]
    for y in range(img.shape[0]):
        for x in range(w // 2):
            for c in range(3):
                a = img[y, x, c]
                img[y, x, c] = img[y, w - 1 - x, c]
                img[y, w - 1 - x, c] = a


@parallel
def batch(images, view, indices, base, salt_, p):
    for n in prange(images.shape[0]):
        if applies(sample_key(base, indices[n], salt_), p):
            hflip(images[n, view])


name_kernels(globals())
