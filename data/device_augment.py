"""The GPU side of the view recipe: colour jitter, grayscale, blur and solarize on uint8 image batches.

The loader still crops and flips on the CPU and draws every random choice there (each op's ``record`` in
data/ops/, the same draws as its ``batch``); it hands the choices over as one float64 row per image and these
functions apply them to a uint8 [B, H, W, 3] batch on whatever device it lives on. Why: at 224 px the colour ops
were about 40% of the loader's CPU time per image (two-view loaders on 2 cores), and they are cheap elementwise
work on a GPU.

Every function is bit-identical to its numba kernel in data/ops/ applied image by image: it repeats
the kernel's float32 (and, where the kernel has them, float64 / int64) operations in the same order, one torch
op each, so no fused multiply-add or reassociation can appear on any device. Keep it that way: no
addcmul / lerp / ``add(alpha=...)`` with alpha other than 1, no ``torch.compile``, no ``scalar / tensor``
(torch computes it as a reciprocal times the scalar), no division by a Python scalar (CUDA turns it into a
multiplication by the reciprocal), no convolutions (another summation order).

``params`` layout (data/ops/__init__.py derives the numbers), one float64 row of ``params_width(recipe)``
columns per image:

- ``COL_JITTER``: 1.0 if ColorJitter is applied, else 0.0
- ``COL_ORDER`` (4 columns): the jitter order, a permutation of 0..3 (brightness, contrast, saturation, hue)
- ``COL_FACTORS`` (4 columns): the four jitter factors, as ``jitter_params`` returns them
- ``COL_GRAY``, ``COL_BLUR``, ``COL_SOLARIZE``: 1.0 if that op is applied
- ``COL_WEIGHTS`` (2K + 1 columns, K = ``blur_radius(recipe.blur_sigma_max)``): the image's blur kernel,
  ``gaussian_kernel(sigma, r)`` with r = min(ceil(3 sigma), H - 1, W - 1) as numba's gaussian_blur clips it,
  centred at column ``COL_WEIGHTS + K`` and zero elsewhere (float32 values stored as float64).

Columns of an op that is not applied are ignored. Pass ``params`` on the CPU: the decisions are read there,
so no device synchronisation is needed to pick the images each op touches.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from data.ops import COL_WEIGHTS, COLUMNS, blur_radius, params_width  # noqa: F401  (tests read D.blur_radius)
from data.recipes import ViewRecipe

COL_JITTER, COL_ORDER, COL_FACTORS, COL_GRAY, COL_BLUR, COL_SOLARIZE = (
    COLUMNS[name] for name in ("jitter", "order", "factors", "gray", "blur", "solarize"))

# The numba kernels' float32 constants, as the exact Python floats of those float32 values (so every device
# casts them back to the same float32).
_GR, _GG, _GB = (float(np.float32(v)) for v in (0.2989, 0.587, 0.114))
_INV255 = float(np.float32(1.0 / 255.0))
_SIXTH = float(np.float32(1.0 / 6.0))
_TO_U8 = float(np.float32(255.0 + 1.0 - 1e-3))

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------- helpers


def _per_image(v: Tensor, x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """A length-B parameter on x's device as ``dtype``, shaped [B, 1, 1, 1] to broadcast over an image."""
    return v.to(x.device, dtype).reshape(-1, 1, 1, 1)


def _gray(x: Tensor) -> Tensor:
    """grayscale.luma in float32: ((r * 0.2989 + g * 0.587) + b * 0.114), [B, H, W]."""
    y = x[..., 0].float() * _GR
    y = y + x[..., 1].float() * _GG
    return y + x[..., 2].float() * _GB


def _to_u8(y: Tensor) -> Tensor:
    """min(max(y, 0), 255), truncated to uint8 (y is a temporary: clamped in place)."""
    return y.clamp_(0.0, 255.0).to(torch.uint8)


def _blend(x: Tensor, f: Tensor, g: Tensor) -> Tensor:
    """jitter._blend_lut's entries computed per pixel: trunc(clamp(x * f + g)), f and g float32."""
    y = x.float() * f
    return _to_u8(y + g)


# ---------------------------------------------------------------------------------------------- colour ops


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """jitter.adjust_brightness: trunc(clamp(x * f)).

    The kernel also adds g = 0.0 * (1 - f), which is +-0.0: adding it changes no sum that is not zero, and a
    zero one clamps to 0 either way, so it is left out.
    """
    return _to_u8(x.float() * _per_image(factor, x, torch.float32))


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """jitter.adjust_contrast: blend with the mean of the floored gray image (int64 sum, float64 mean)."""
    total = _gray(x).to(torch.int64).sum(dim=(1, 2)).to(torch.float64)
    # Divide by a tensor, not a Python int: CUDA turns division by a scalar into a reciprocal multiplication.
    mean = (total / torch.full_like(total, x.shape[1] * x.shape[2])).to(torch.float32)
    factor = factor.to(x.device, torch.float64)
    g = mean * (1.0 - factor).to(torch.float32)
    return _blend(x, _per_image(factor, x, torch.float32), g.reshape(-1, 1, 1, 1))


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """jitter.adjust_saturation: blend each pixel with its own floored gray value."""
    factor = factor.to(x.device, torch.float64)
    gray = _gray(x).trunc() * (1.0 - factor).to(torch.float32).reshape(-1, 1, 1)
    return _blend(x, _per_image(factor, x, torch.float32), gray.unsqueeze(-1))


def adjust_hue(x: Tensor, hue_factor: Tensor) -> Tensor:
    """jitter.adjust_hue: RGB -> HSV, h = (h + factor) mod 1, HSV -> RGB, each float32 step as the kernel."""
    shift = hue_factor.to(x.device, torch.float64).to(torch.float32).reshape(-1, 1, 1)
    r = x[..., 0].float() * _INV255
    g = x[..., 1].float() * _INV255
    b = x[..., 2].float() * _INV255
    maxc = torch.maximum(r, torch.maximum(g, b))
    minc = torch.minimum(r, torch.minimum(g, b))
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(cr)
    s = cr / torch.where(eqc, ones, maxc)
    inv = ones / torch.where(eqc, ones, cr)  # tensor / tensor: ``1 / t`` would be reciprocal() * 1
    rc = (maxc - r) * inv
    gc = (maxc - g) * inv
    bc = (maxc - b) * inv
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, (rc + 2.0) - bc, (gc + 4.0) - rc))
    h = h * _SIXTH
    h = h + 1.0
    h = torch.where(h >= 1.0, h - 1.0, h)
    h = h + shift
    h = torch.where(h < 0.0, h + 1.0, h)
    h = torch.where(h >= 1.0, h - 1.0, h)
    h6 = h * 6.0
    sector = h6.to(torch.int32)
    f = h6 - sector.to(torch.float32)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = ((1.0 - sxf) * maxc).clamp_(0.0, 1.0)
    t = ((sxf + one_minus_s) * maxc).clamp_(0.0, 1.0)
    p = (one_minus_s * maxc).clamp_(0.0, 1.0)
    sector = torch.where(sector >= 6, sector - 6, sector)
    # the kernel's rows of v2's select table [[v, q, p, p, t, v], [t, v, v, q, p, p], [p, p, t, v, v, q]]
    ro = torch.where((sector == 0) | (sector == 5), maxc,
                     torch.where(sector == 1, q, torch.where(sector < 4, p, t)))
    go = torch.where(sector == 0, t, torch.where(sector < 3, maxc, torch.where(sector == 3, q, p)))
    bo = torch.where(sector < 2, p, torch.where(sector == 2, t, torch.where(sector < 5, maxc, q)))
    return (torch.stack((ro, go, bo), dim=-1) * _TO_U8).to(torch.uint8)


def to_grayscale(x: Tensor) -> Tensor:
    """grayscale.to_grayscale: the truncated luma in all three channels."""
    return _gray(x).to(torch.uint8).unsqueeze(-1).expand(*x.shape).contiguous()


def solarize(x: Tensor, threshold: int) -> Tensor:
    """solarize.solarize: values >= threshold become 255 - value (threshold 256 changes nothing)."""
    level = math.ceil(threshold)  # v >= threshold for an integer v, a threshold that fits in the comparison
    if level > 255:
        return x.clone(memory_format=torch.contiguous_format)
    return torch.where(x >= max(level, 0), 255 - x, x)


# ---------------------------------------------------------------------------------------------- blur


def _reflect_index(n: int, k: int, device: torch.device) -> Tensor:
    """blur._reflect(i, n) for i in -k .. n + k - 1 (torch's 'reflect': no edge repeat).

    Indices that one reflection cannot bring inside (k >= n) are clamped: numba clips the radius to n - 1, so
    those taps have weight 0 and only need to read some finite pixel.
    """
    i = torch.arange(-k, n + k, device=device)
    i = torch.where(i < 0, -i, torch.where(i >= n, 2 * n - 2 - i, i))
    return i.clamp_(0, n - 1)


def gaussian_blur(x: Tensor, weights: Tensor) -> Tensor:
    """blur.gaussian_blur with each image's own kernel: ``weights`` float32 [B, 2K + 1], centred at K.

    Like the kernel: a row pass into float32, then a column pass, each summing the taps one after another
    from the leftmost (top) tap, then rint, clamp, uint8. An image whose radius r < K has zero weights outside
    taps K - r .. K + r; those add exactly 0.0, so the sums have the bits of the kernel's 2 r + 1 taps.
    """
    b, h, w, _ = x.shape
    k = weights.shape[1]
    rad = (k - 1) // 2
    if k != 2 * rad + 1 or weights.shape[0] != b:
        raise ValueError(f"weights must be [B={b}, 2K + 1], got {tuple(weights.shape)}")
    wts = weights.to(x.device, torch.float32)
    taps = [wts[:, j].reshape(-1, 1, 1, 1) for j in range(k)]
    src = x.index_select(2, _reflect_index(w, rad, x.device)).float()  # [B, H, W + 2K, 3]
    acc = src[:, :, 0:w] * taps[0]
    for j in range(1, k):
        acc = acc + src[:, :, j:j + w] * taps[j]
    src = acc.index_select(1, _reflect_index(h, rad, x.device))  # [B, H + 2K, W, 3]
    acc = src[:, 0:h] * taps[0]
    for j in range(1, k):
        acc = acc + src[:, j:j + h] * taps[j]
    return _to_u8(acc.round_())


# ---------------------------------------------------------------------------------------------- jitter and view

_JITTER_OPS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (
    adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _rows(mask: Tensor) -> Tensor:
    """Indices (CPU, int64) where a CPU boolean mask is set."""
    return mask.nonzero().reshape(-1)


def _indices_to(index_sets: list[Tensor], device: torch.device) -> list[Tensor]:
    """CPU index sets on ``device`` in one pinned, non-blocking copy. A pageable or blocking copy would wait
    for every kernel queued before it (the previous training step), once per op and view."""
    if device.type == "cpu" or not index_sets:
        return index_sets
    flat = torch.cat(index_sets).pin_memory().to(device, non_blocking=True)  # its own pinned block, kept
    # by PyTorch's host allocator until the copy is done
    return list(flat.split([len(rows) for rows in index_sets]))


def _jitter_plan(rows: Tensor, order: Tensor, recipe: ViewRecipe) -> list[tuple[int, Tensor]]:
    """color_jitter as (op, image indices) in the order applied: at step s each image ``rows[i]`` gets its own op
    ``order[i, s]``; ops whose strength in ``recipe`` is 0 are skipped, as numba does."""
    strengths = (recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)
    return [(op, rows[order[:, step] == op]) for step in range(4) for op in range(4) if strengths[op] > 0]


def _apply(out: Tensor, count: int, rows: Tensor, fn: Callable[..., Tensor], *args) -> None:
    """out[rows] = fn(out[rows], *args) in place for ``count`` selected images (none: nothing runs)."""
    if count:
        out[rows] = fn(out[rows], *args)


def color_jitter(x: Tensor, order: Tensor, factors: Tensor, recipe: ViewRecipe) -> Tensor:
    """jitter.color_jitter per image: ``order`` int [B, 4] (each row a permutation of 0..3), ``factors`` float64
    [B, 4]; brightness, contrast, saturation, hue whose strength in ``recipe`` is 0 are skipped."""
    plan = _jitter_plan(torch.arange(x.shape[0]), order.cpu().long(), recipe)
    factors = factors.to(x.device, torch.float64)
    out = x.clone(memory_format=torch.contiguous_format)
    for (op, host), rows in zip(plan, _indices_to([rows for _, rows in plan], x.device), strict=True):
        _apply(out, len(host), rows, _JITTER_OPS[op], factors[rows, op])
    return out


def apply_view(x: Tensor, params: Tensor, recipe: ViewRecipe) -> Tensor:
    """The colour part of one view, after crop and flip: RandomApply(ColorJitter) -> RandomGrayscale ->
    RandomApply(GaussianBlur) -> RandomApply(Solarize), with each image's decisions and parameters in
    ``params`` (float64 [B, params_width(recipe)], layout in the module docstring). Each op runs on the
    images it applies to only (blur, the dearest, is on 10% of one MoCo view). The decisions are read on the
    host, and the image indices cross to the device in one non-blocking copy: no host sync."""
    width = params_width(recipe)
    if params.ndim != 2 or params.shape != (x.shape[0], width):
        raise ValueError(f"params must be [B={x.shape[0]}, {width}] for this recipe, got {tuple(params.shape)}")
    host = params.detach().to("cpu", torch.float64)
    # A pinned copy of its own, which PyTorch keeps until the transfer is done: FFCV refills its buffer later.
    dev = host if x.device.type == "cpu" else host.pin_memory().to(x.device, non_blocking=True)
    jitter_rows = _rows(host[:, COL_JITTER] != 0)
    plan = _jitter_plan(jitter_rows, host[jitter_rows, COL_ORDER].long(), recipe)
    later = [_rows(host[:, col] != 0) for col in (COL_GRAY, COL_BLUR, COL_SOLARIZE)]
    *jitter, gray, blur, solar = _indices_to([rows for _, rows in plan] + later, x.device)
    out = x.clone(memory_format=torch.contiguous_format)
    for (op, host_rows), rows in zip(plan, jitter, strict=True):
        _apply(out, len(host_rows), rows, _JITTER_OPS[op], dev[rows, COL_FACTORS.start + op])
    n_gray, n_blur, n_solar = (len(rows) for rows in later)
    _apply(out, n_gray, gray, to_grayscale)
    _apply(out, n_blur, blur, gaussian_blur, dev[blur, COL_WEIGHTS:].to(torch.float32))
    _apply(out, n_solar, solar, solarize, recipe.solarize_threshold)
    return out
