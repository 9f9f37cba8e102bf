"""RandomApply(GaussianBlur(sigma ~ U(blur_sigma_min, blur_sigma_max)), blur_p), kernel 2 ceil(3 sigma) + 1 (MoCo's
PIL blur has no kernel size; 3 sigma covers 99.7% of the mass)."""

from __future__ import annotations

import math

import numpy as np
from numba import prange
from numba.extending import register_jitable

from data.ops import COL_WEIGHTS, COLUMNS, blur_radius
from data.ops.base import F0, F255, applies, kernel, name_kernels, parallel, sample_key, uniform

register_jitable(blur_radius)  # the layout's own function, callable from the kernels below
_ON = COLUMNS["blur"]


def args(r) -> tuple | None:
    return (float(r.blur_p), float(r.blur_sigma_min), float(r.blur_sigma_max)) if r.blur_p > 0 else None


@kernel
def gaussian_kernel(sigma, radius):
    """v2's _get_gaussian_kernel1d(2 r + 1, sigma) in float32: softmax(-(x / sigma)^2), x = linspace(+-r/sqrt 2)."""
    k = 2 * radius + 1
    x = np.empty(k, np.float32)
    lim = (k - 1) / (2.0 * math.sqrt(2.0))
    for i in range(k):
        x[i] = np.float32(-lim + 2.0 * lim * i / (k - 1)) if k > 1 else np.float32(0.0)
    w = np.empty(k, np.float32)
    for i in range(k):
        w[i] = np.float32(math.exp(-(np.float64(x[i]) / sigma) ** 2))
    return w / w.sum()


@kernel
def _reflect(i, n):
    """torch's 'reflect' padding index (no edge repeat), for |overhang| < n."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * n - 2 - i
    return i


@kernel
def gaussian_blur(img, sigma, radius):
    """v2.functional.gaussian_blur(kernel_size=2 r + 1, sigma) with reflect padding, rounded to uint8.

    Separable (a row pass into a float32 buffer, then a column pass) instead of torchvision's 2-D
    convolution: the same sums in another order, so results differ only by float rounding (<= 1 level).
    ``radius`` is clipped to side - 1, the most reflect padding allows.
    """
    h, w = img.shape[0], img.shape[1]
    radius = min(radius, h - 1, w - 1)
    if radius <= 0:
        return
    wts = gaussian_kernel(sigma, radius)
    k = 2 * radius + 1
    row = np.empty((w + 2 * radius) * 3, np.float32)
    tmp = np.empty((h, w * 3), np.float32)
    for y in range(h):
        for xp in range(w + 2 * radius):
            xs = _reflect(xp - radius, w)
            for c in range(3):
                row[xp * 3 + c] = img[y, xs, c]
        out = tmp[y]
        out[:] = 0.0
        for j in range(k):
            wj = wts[j]
            seg = row[j * 3:j * 3 + w * 3]
            for i in range(w * 3):
                out[i] += wj * seg[i]
    acc = np.empty(w * 3, np.float32)
    flat = img.reshape(h, w * 3)
    for y in range(h):
        acc[:] = 0.0
        for j in range(k):
            src = tmp[_reflect(y + j - radius, h)]
            wj = wts[j]
            for i in range(w * 3):
                acc[i] += wj * src[i]
        for i in range(w * 3):
            flat[y, i] = np.uint8(min(max(np.rint(acc[i]), F0), F255))


@kernel
def draw(key, sigma_lo, sigma_hi):
    """sigma ~ U(sigma_lo, sigma_hi) (draw 1) and its radius."""
    sigma = sigma_lo + (sigma_hi - sigma_lo) * uniform(key, 1)
    return sigma, blur_radius(sigma)


@parallel
def batch(images, view, indices, base, salt_, p, sigma_lo, sigma_hi):
    for n in prange(images.shape[0]):
        key = sample_key(base, indices[n], salt_)
        if applies(key, p):
            sigma, radius = draw(key, sigma_lo, sigma_hi)
            gaussian_blur(images[n, view], sigma, radius)


@kernel
def record(rows, indices, base, salt_, side, p, sigma_lo, sigma_hi):
    """The flag, and the image's kernel centred at COL_WEIGHTS + blur_radius(sigma_hi), zero elsewhere."""
    centre = COL_WEIGHTS + blur_radius(sigma_hi)
    for n in range(rows.shape[0]):
        key = sample_key(base, indices[n], salt_)
        if applies(key, p):
            sigma, radius = draw(key, sigma_lo, sigma_hi)
            radius = min(radius, side - 1)  # gaussian_blur's clip to the image side
            rows[n, _ON] = 1.0
            rows[n, centre - radius:centre + radius + 1] = gaussian_kernel(sigma, radius)


name_kernels(globals())
