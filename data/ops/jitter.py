"""RandomApply(ColorJitter(brightness, contrast, saturation, hue), jitter_p): hue included, a random order per image.

Each adjustment follows ``torchvision.transforms.v2.functional`` on uint8 step by step (float32 arithmetic, the
same truncation points), tested against it in tests/test_augment.py.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from data.ops import COLUMNS
from data.ops.base import F0, F255, applies, kernel, name_kernels, parallel, sample_key, uniform
from data.ops.grayscale import luma

_ON, _ORDER, _FACTORS = COLUMNS["jitter"], COLUMNS["order"], COLUMNS["factors"]


def args(r) -> tuple | None:
    strengths = (r.brightness, r.contrast, r.saturation, r.hue)
    return tuple(float(v) for v in (r.jitter_p, *strengths)) if r.jitter_p > 0 and max(strengths) > 0 else None


@kernel
def _blend_lut(factor, other):
    """uint8 table of v2's _blend(x, other, factor) = trunc(clamp(x * f + other * (1 - f), 0, 255))."""
    f = np.float32(factor)
    g = np.float32(other) * np.float32(1.0 - factor)
    lut = np.empty(256, np.uint8)
    for v in range(256):
        lut[v] = np.uint8(min(max(np.float32(v) * f + g, F0), F255))
    return lut


@kernel
def _apply_lut(img, lut):
    flat = img.reshape(-1)
    for i in range(flat.size):
        flat[i] = lut[flat[i]]


@kernel
def adjust_brightness(img, factor):
    """v2.functional.adjust_brightness: x * factor, clamped, truncated to uint8 (a 256-entry table)."""
    _apply_lut(img, _blend_lut(factor, 0.0))


@kernel
def adjust_contrast(img, factor):
    """v2.functional.adjust_contrast: blend with the mean of the floored grayscale image."""
    flat = img.reshape(-1)
    total = 0
    for i in range(flat.size // 3):
        total += int(luma(flat[3 * i], flat[3 * i + 1], flat[3 * i + 2]))  # floor of a value >= 0
    _apply_lut(img, _blend_lut(factor, np.float32(total / (flat.size // 3))))


@kernel
def adjust_saturation(img, factor):
    """v2.functional.adjust_saturation: blend each pixel with its own floored grayscale value."""
    f = np.float32(factor)
    g = np.float32(1.0 - factor)
    flat = img.reshape(-1)
    for i in range(flat.size // 3):
        gray = np.float32(int(luma(flat[3 * i], flat[3 * i + 1], flat[3 * i + 2]))) * g  # floored
        for c in range(3):
            flat[3 * i + c] = np.uint8(min(max(np.float32(flat[3 * i + c]) * f + gray, F0), F255))


_INV255 = np.float32(1.0 / 255.0)
_SIXTH = np.float32(1.0 / 6.0)
_TO_U8 = np.float32(255.0 + 1.0 - 1e-3)  # v2's to_dtype(float -> uint8, scale=True) multiplier


@kernel
def adjust_hue(img, hue_factor):
    """v2.functional.adjust_hue: to float in [0, 1], RGB -> HSV, h = (h + factor) mod 1, HSV -> RGB, to uint8.

    The float32 formulas of v2's _rgb_to_hsv / _hsv_to_rgb, written as selects rather than branches so that
    LLVM vectorises the loop (8x faster); fmod / remainder / floor become the comparisons they reduce to
    on the ranges that occur (h in [5/6, 7/6] before the fmod, h + factor in (-1/2, 3/2)), and the three
    divisions by the channel range one reciprocal (1 ulp: it can move a truncation by one level).
    """
    shift = np.float32(hue_factor)
    one = np.float32(1.0)
    flat = img.reshape(-1)
    for i in range(flat.size // 3):
        r = np.float32(flat[3 * i]) * _INV255
        g = np.float32(flat[3 * i + 1]) * _INV255
        b = np.float32(flat[3 * i + 2]) * _INV255
        maxc = max(r, max(g, b))
        minc = min(r, min(g, b))
        eqc = maxc == minc
        cr = maxc - minc
        s = cr / (one if eqc else maxc)
        inv = one / (one if eqc else cr)
        rc, gc, bc = (maxc - r) * inv, (maxc - g) * inv, (maxc - b) * inv
        h = (bc - gc) if maxc == r else (((rc + np.float32(2.0)) - bc) if maxc == g
                                         else ((gc + np.float32(4.0)) - rc))
        h = h * _SIXTH + one
        h = h - one if h >= one else h
        h = h + shift
        h = h + one if h < F0 else h
        h = h - one if h >= one else h
        # _hsv_to_rgb with v = maxc
        h6 = h * np.float32(6.0)
        sector = np.int32(h6)
        f = h6 - np.float32(sector)
        sxf = s * f
        one_minus_s = one - s
        q = min(max((one - sxf) * maxc, F0), one)
        t = min(max((sxf + one_minus_s) * maxc, F0), one)
        p = min(max(one_minus_s * maxc, F0), one)
        sector = sector - 6 if sector >= 6 else sector
        # rows of v2's select table [[v, q, p, p, t, v], [t, v, v, q, p, p], [p, p, t, v, v, q]]
        ro = maxc if (sector == 0 or sector == 5) else (q if sector == 1 else (p if sector < 4 else t))
        go = t if sector == 0 else (maxc if sector < 3 else (q if sector == 3 else p))
        bo = p if sector < 2 else (t if sector == 2 else (maxc if sector < 5 else q))
        flat[3 * i] = np.uint8(ro * _TO_U8)
        flat[3 * i + 1] = np.uint8(go * _TO_U8)
        flat[3 * i + 2] = np.uint8(bo * _TO_U8)


@kernel
def jitter_params(key, brightness, contrast, saturation, hue):
    """ColorJitter.get_params with seeded draws 1-7: (order of the 4 ops, their 4 factors).

    Order is a uniform permutation (Fisher-Yates); factors are U(max(0, 1 - s), 1 + s) for brightness,
    contrast and saturation, U(-hue, hue) for hue, as torchvision.
    """
    order = np.arange(4)
    for k in range(3, 0, -1):
        j = int(uniform(key, 4 - k) * (k + 1))
        order[k], order[j] = order[j], order[k]
    factors = np.empty(4)
    for n, s in enumerate((brightness, contrast, saturation)):
        lo = max(0.0, 1.0 - s)
        factors[n] = lo + (1.0 + s - lo) * uniform(key, 4 + n)
    factors[3] = -hue + 2.0 * hue * uniform(key, 7)
    return order, factors


@kernel
def color_jitter(img, order, factors, brightness, contrast, saturation, hue):
    """torchvision ColorJitter with known parameters: the four adjustments in ``order``, zero strengths skipped."""
    for op in order:
        if op == 0 and brightness > 0:
            adjust_brightness(img, factors[0])
        elif op == 1 and contrast > 0:
            adjust_contrast(img, factors[1])
        elif op == 2 and saturation > 0:
            adjust_saturation(img, factors[2])
        elif op == 3 and hue > 0:
            adjust_hue(img, factors[3])


@parallel
def batch(images, view, indices, base, salt_, p, brightness, contrast, saturation, hue):
    for n in prange(images.shape[0]):
        key = sample_key(base, indices[n], salt_)
        if applies(key, p):
            order, factors = jitter_params(key, brightness, contrast, saturation, hue)
            color_jitter(images[n, view], order, factors, brightness, contrast, saturation, hue)


@kernel
def record(rows, indices, base, salt_, side, p, brightness, contrast, saturation, hue):
    for n in range(rows.shape[0]):
        key = sample_key(base, indices[n], salt_)
        if applies(key, p):
            rows[n, _ON] = 1.0
            rows[n, _ORDER], rows[n, _FACTORS] = jitter_params(key, brightness, contrast, saturation, hue)


name_kernels(globals())
