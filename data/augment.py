"""Seeded per-image SSL augmentations: numba kernels and the FFCV operations that run them.

Why not FFCV's own RandomResizedCrop / RandomHorizontalFlip / colour ops
-------------------------------------------------------------------------
FFCV 1.0.2 draws their random parameters from numba's per-thread generators (``np.random`` inside jitted
code), seeded from OS entropy, and its colour jitter has no hue. Here every random number is a pure function
of ``(seed, epoch, sample index, view, op, draw)``, hashed with splitmix64 (a counter-based generator), so:

- every choice is made per image, never per batch;
- the same seed gives the same views in any process, with any number of threads or workers, on any rank;
- a different epoch gives different views of the same image.

How an operation learns the epoch: FFCV compiles each operation once per loader, and numba freezes
closure variables (a closure array is copied into the compiled code as a constant), so the epoch cannot be
a closure variable. Operations *can* get two runtime inputs: ``batch_indices`` (the samples' indices in the
file, passed when the code has ``with_indices = True``) and their own memory buffers (``AllocationQuery``),
which FFCV allocates per epoch and passes on every call. Each seeded operation therefore declares a one-word
"key cell", and :class:`SeededLoader` (a small ``ffcv.loader.Loader`` subclass) writes
``epoch_key(seed, epoch)`` into every cell before each batch. An operation then keys image ``n`` with
``sample_key(cell, batch_indices[n], salt)``, the salt naming the view and the operation.

Compile time: FFCV compiles each operation's closure with numba in every new loader (parallel loops are the
slow part). Here the closures are trivial wrappers; the parallel batch loops and the per-image kernels are
module-level functions compiled with ``cache=True``, so they are compiled once per machine (numba's on-disk
cache next to this file) and loaded in later processes; the wrappers are cached too (data/ffcv_compile.py).
Only the decoders (they call FFCV's C code through ctypes) and FFCV's glue are compiled per process.

Per-image kernels follow ``torchvision.transforms.v2.functional`` on uint8 tensors step by step (float32
arithmetic, the same truncation / rounding points), so each is tested against it (tests/test_augment.py).

Views: SeededRandomResizedCrops decodes each image once and cuts all its views into a [B, V, H, W, 3]
batch; every later op acts on its own view ``images[:, v]``. On a GPU (data.loaders' ``device_ops``) the
loader's threads stop after the flips: ViewParams draws the colour choices with the same keys, and
data/device_augment.py applies them there with the same bits, since every stage is compiled without
fast-math (data/ffcv_compile.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from numba import njit, prange

from data.device_augment import COL_WEIGHTS, blur_radius, params_width
from data.ffcv_compile import name_kernels
from data.loader_thread import GuardedEpochIterator, GuardedLoader
from data.normalize import normalize_table

# Compiled once per machine (numba's on-disk cache); error_model "numpy" drops the division-by-zero checks
# that would stop LLVM from vectorising the pixel loops.
_kernel = njit(cache=True, error_model="numpy")
_batch = njit(cache=True, error_model="numpy", parallel=True)


# ---------------------------------------------------------------------------------------------- random numbers

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TWO_M53 = 1.0 / 9007199254740992.0

# Operation codes, mixed into the salt so that two ops of one view draw independent numbers.
OP_CROP, OP_FLIP, OP_JITTER, OP_GRAY, OP_BLUR, OP_SOLARIZE = range(1, 7)


@_kernel
def mix64(z):
    """splitmix64's finaliser: a bijective 64-bit hash (all arithmetic in uint64, wrapping)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@_kernel
def sample_key(base, sample, salt):
    """Key of one image in one op of one view: hash of the epoch key, the sample index and the salt."""
    return mix64(base ^ mix64(np.uint64(sample) * _GOLDEN + np.uint64(salt)))


@_kernel
def uniform(key, j):
    """The j-th uniform float64 in [0, 1) of ``key`` (53 random bits)."""
    return np.float64(mix64(key + np.uint64(j + 1) * _GOLDEN) >> _S11) * _TWO_M53


@_kernel
def _epoch_key(seed, epoch):
    return mix64(mix64(seed) ^ (epoch * _GOLDEN))


def epoch_key(seed: int, epoch: int) -> np.uint64:
    """The key every seeded op of an epoch starts from: a hash of (seed, epoch)."""
    return np.uint64(_epoch_key(np.uint64(seed % 2**64), np.uint64(epoch)))


def salt(view: int, op: int) -> int:
    """Salt of ``op`` (one of the OP_* codes) in view number ``view``."""
    return view * 16 + op


# ---------------------------------------------------------------------------------------------- per-image kernels
# Each works in place on one uint8 [H, W, 3] image and matches torchvision.transforms.v2.functional on the
# same uint8 image (CHW there) to the tolerance stated in tests/test_augment.py.

_F0, _F1 = np.float32(0.0), np.float32(255.0)
_GR, _GG, _GB = np.float32(0.2989), np.float32(0.587), np.float32(0.114)


@_kernel
def _blend_lut(factor, other):
    """uint8 table of v2's _blend(x, other, factor) = trunc(clamp(x * f + other * (1 - f), 0, 255))."""
    f = np.float32(factor)
    g = np.float32(other) * np.float32(1.0 - factor)
    lut = np.empty(256, np.uint8)
    for v in range(256):
        lut[v] = np.uint8(min(max(np.float32(v) * f + g, _F0), _F1))
    return lut


@_kernel
def _apply_lut(img, lut):
    flat = img.reshape(-1)
    for i in range(flat.size):
        flat[i] = lut[flat[i]]


@_kernel
def _gray(r, g, b):
    """v2's _rgb_to_grayscale_image in float32 (before any truncation)."""
    return np.float32(r) * _GR + np.float32(g) * _GG + np.float32(b) * _GB


@_kernel
def adjust_brightness(img, factor):
    """v2.functional.adjust_brightness: x * factor, clamped, truncated to uint8 (a 256-entry table)."""
    _apply_lut(img, _blend_lut(factor, 0.0))


@_kernel
def adjust_contrast(img, factor):
    """v2.functional.adjust_contrast: blend with the mean of the floored grayscale image."""
    flat = img.reshape(-1)
    total = 0
    for i in range(flat.size // 3):
        total += int(_gray(flat[3 * i], flat[3 * i + 1], flat[3 * i + 2]))  # floor of a value >= 0
    _apply_lut(img, _blend_lut(factor, np.float32(total / (flat.size // 3))))


@_kernel
def adjust_saturation(img, factor):
    """v2.functional.adjust_saturation: blend each pixel with its own floored grayscale value."""
    f = np.float32(factor)
    g = np.float32(1.0 - factor)
    flat = img.reshape(-1)
    for i in range(flat.size // 3):
        gray = np.float32(int(_gray(flat[3 * i], flat[3 * i + 1], flat[3 * i + 2]))) * g  # floored
        for c in range(3):
            flat[3 * i + c] = np.uint8(min(max(np.float32(flat[3 * i + c]) * f + gray, _F0), _F1))


_INV255 = np.float32(1.0 / 255.0)
_SIXTH = np.float32(1.0 / 6.0)
_TO_U8 = np.float32(255.0 + 1.0 - 1e-3)  # v2's to_dtype(float -> uint8, scale=True) multiplier


@_kernel
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
        h = h + one if h < _F0 else h
        h = h - one if h >= one else h
        # _hsv_to_rgb with v = maxc
        h6 = h * np.float32(6.0)
        sector = np.int32(h6)
        f = h6 - np.float32(sector)
        sxf = s * f
        one_minus_s = one - s
        q = min(max((one - sxf) * maxc, _F0), one)
        t = min(max((sxf + one_minus_s) * maxc, _F0), one)
        p = min(max(one_minus_s * maxc, _F0), one)
        sector = sector - 6 if sector >= 6 else sector
        # rows of v2's select table [[v, q, p, p, t, v], [t, v, v, q, p, p], [p, p, t, v, v, q]]
        ro = maxc if (sector == 0 or sector == 5) else (q if sector == 1 else (p if sector < 4 else t))
        go = t if sector == 0 else (maxc if sector < 3 else (q if sector == 3 else p))
        bo = p if sector < 2 else (t if sector == 2 else (maxc if sector < 5 else q))
        flat[3 * i] = np.uint8(ro * _TO_U8)
        flat[3 * i + 1] = np.uint8(go * _TO_U8)
        flat[3 * i + 2] = np.uint8(bo * _TO_U8)


@_kernel
def to_grayscale(img):
    """v2.functional.rgb_to_grayscale(num_output_channels=3): truncated luma in all three channels."""
    flat = img.reshape(-1)
    for i in range(flat.size // 3):
        gray = np.uint8(_gray(flat[3 * i], flat[3 * i + 1], flat[3 * i + 2]))
        flat[3 * i] = gray
        flat[3 * i + 1] = gray
        flat[3 * i + 2] = gray


@_kernel
def solarize(img, threshold):
    """v2.functional.solarize: values >= threshold become 255 - value."""
    flat = img.reshape(-1)
    for i in range(flat.size):
        flat[i] = np.uint8(255) - flat[i] if flat[i] >= threshold else flat[i]


@_kernel
def hflip(img):
    """Mirror the columns (v2.functional.horizontal_flip)."""
    w = img.shape[1]
    for y in range(img.shape[0]):
        for x in range(w // 2):
            for c in range(3):
                a = img[y, x, c]
                img[y, x, c] = img[y, w - 1 - x, c]
                img[y, w - 1 - x, c] = a


@_kernel
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


@_kernel
def _reflect(i, n):
    """torch's 'reflect' padding index (no edge repeat), for |overhang| < n."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * n - 2 - i
    return i


@_kernel
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
            flat[y, i] = np.uint8(min(max(np.rint(acc[i]), _F0), _F1))


# ---------------------------------------------------------------------------------------------- random parameters


@_kernel
def random_resized_crop_params(height, width, key, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi):
    """torchvision RandomResizedCrop.get_params with seeded draws: (top, left, h, w) of the crop.

    Ten tries of area ~ U(scale) * H * W and log aspect ~ U(log ratio); the first crop that fits wins,
    at a uniform position; otherwise the centre crop clipped to the ratio range.
    """
    area = np.float64(height) * np.float64(width)
    for t in range(10):
        target = area * (scale_lo + (scale_hi - scale_lo) * uniform(key, 4 * t))
        aspect = math.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * uniform(key, 4 * t + 1))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            i = int(uniform(key, 4 * t + 2) * (height - h + 1))
            j = int(uniform(key, 4 * t + 3) * (width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < math.exp(log_ratio_lo):
        w = width
        h = round(w / math.exp(log_ratio_lo))
    elif in_ratio > math.exp(log_ratio_hi):
        h = height
        w = round(h * math.exp(log_ratio_hi))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@_kernel
def jitter_params(key, brightness, contrast, saturation, hue):
    """ColorJitter.get_params with seeded draws: (order of the 4 ops, their 4 factors).

    Order is a uniform permutation (Fisher-Yates); factors are U(max(0, 1 - s), 1 + s) for brightness,
    contrast and saturation, U(-hue, hue) for hue, as torchvision. Draws 0 (p) is left to the caller.
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


@_kernel
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


# ---------------------------------------------------------------------------------------------- batch loops
# Module-level and cached: these hold the parallel loops, so FFCV's per-loader compile stays small. Each takes
# the [B, V, H, W, 3] batch of all views (one decode per image, SeededRandomResizedCrops) and the view it
# acts on: images[n, view] is a C-contiguous image, so the kernels vectorise as on a one-view batch.


@_batch
def flip_batch(images, view, indices, base, salt_, p):
    for n in prange(images.shape[0]):
        if uniform(sample_key(base, indices[n], salt_), 0) < p:
            hflip(images[n, view])


@_batch
def jitter_batch(images, view, indices, base, salt_, p, brightness, contrast, saturation, hue):
    for n in prange(images.shape[0]):
        key = sample_key(base, indices[n], salt_)
        if uniform(key, 0) < p:
            order, factors = jitter_params(key, brightness, contrast, saturation, hue)
            color_jitter(images[n, view], order, factors, brightness, contrast, saturation, hue)


@_batch
def grayscale_batch(images, view, indices, base, salt_, p):
    for n in prange(images.shape[0]):
        if uniform(sample_key(base, indices[n], salt_), 0) < p:
            to_grayscale(images[n, view])


@_kernel
def blur_draw(key, sigma_lo, sigma_hi):
    """GaussianBlur's sigma ~ U(sigma_lo, sigma_hi) (draw 1 of the op's key) and its radius ceil(3 sigma)."""
    sigma = sigma_lo + (sigma_hi - sigma_lo) * uniform(key, 1)
    return sigma, math.ceil(3.0 * sigma)


@_batch
def blur_batch(images, view, indices, base, salt_, p, sigma_lo, sigma_hi):
    for n in prange(images.shape[0]):
        key = sample_key(base, indices[n], salt_)
        if uniform(key, 0) < p:
            sigma, radius = blur_draw(key, sigma_lo, sigma_hi)
            gaussian_blur(images[n, view], sigma, radius)


@_batch
def solarize_batch(images, view, indices, base, salt_, p, threshold):
    for n in prange(images.shape[0]):
        if uniform(sample_key(base, indices[n], salt_), 0) < p:
            solarize(images[n, view], threshold)


@_batch
def view_params_batch(out, view, indices, base, salts, probs, centre, max_radius):
    """The colour choices of view ``view`` for the device (data/device_augment.py), into ``out[:, view]``.

    The same keys and draws as jitter_batch, grayscale_batch, blur_batch and solarize_batch, so the device
    makes the choices the loader's threads would. ``salts``: the four ops' salts; ``probs``: (jitter p,
    brightness, contrast, saturation, hue, grayscale p, blur p, sigma_lo, sigma_hi, solarize p). Row layout:
    data/device_augment.py; the blur kernel is centred at column ``centre`` and its radius clipped to
    ``max_radius`` (side - 1) as gaussian_blur clips it.
    """
    for n in prange(out.shape[0]):
        row = out[n, view]
        row[:] = 0.0
        key = sample_key(base, indices[n], salts[0])
        if uniform(key, 0) < probs[0]:
            order, factors = jitter_params(key, probs[1], probs[2], probs[3], probs[4])
            row[0] = 1.0
            row[1:5] = order
            row[5:9] = factors
        if uniform(sample_key(base, indices[n], salts[1]), 0) < probs[5]:
            row[9] = 1.0
        key = sample_key(base, indices[n], salts[2])
        if uniform(key, 0) < probs[6]:
            sigma, radius = blur_draw(key, probs[7], probs[8])
            radius = min(radius, max_radius)  # gaussian_blur's clip to the image side
            row[10] = 1.0
            row[centre - radius:centre + radius + 1] = gaussian_kernel(sigma, radius)
        if uniform(sample_key(base, indices[n], salts[3]), 0) < probs[9]:
            row[11] = 1.0


@_kernel
def _normalize(src, dst, table):
    """One uint8 [H, W, 3] image -> float32 via a [256, 3] table of (v - mean) / std (NormalizeImage's way)."""
    src, dst = src.reshape(-1, 3), dst.reshape(-1, 3)
    for i in range(src.shape[0]):
        for c in range(3):
            dst[i, c] = table[src[i, c], c]


@_batch
def normalize_batch(images, out, table):
    """uint8 [B, V, H, W, 3] -> float32 view-major [V, B, H, W, 3]."""
    for n in prange(images.shape[0]):
        for v in range(images.shape[1]):
            _normalize(images[n, v], out[v, n], table)


# ---------------------------------------------------------------------------------------------- FFCV operations

_KEY_CELL = AllocationQuery((1,), np.dtype("<u8"))


class SeededOperation(Operation):
    """An in-place uint8 op on view ``view`` of a [B, V, H, W, 3] batch, its random choices keyed by
    (seed, epoch, sample, view, ``op``).

    Its memory is one key cell per sample slot, filled by SeededLoader (see the module docstring).
    Subclasses give ``op`` (an OP_* code) and ``batch_fn`` (a cached parallel loop) and pass its constant
    parameters, in its order, as ``params``.
    """

    op = 0
    batch_fn = None

    def __init__(self, view: int, *params) -> None:
        super().__init__()
        self.view, self.salt, self.params = view, np.uint64(salt(view, self.op)), params

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        return replace(previous_state, jit_mode=True), _KEY_CELL

    def generate_code(self):
        batch_fn, view, salt_, args = type(self).batch_fn, self.view, self.salt, self.params

        def seeded_op(images, cell, indices):
            batch_fn(images, view, indices, cell[0, 0], salt_, *args)
            return images

        seeded_op.with_indices = True
        return seeded_op


class RandomFlip(SeededOperation):
    """Horizontal flip with probability ``p``."""

    op, batch_fn = OP_FLIP, flip_batch

    def __init__(self, view: int, p: float) -> None:
        super().__init__(view, float(p))


class RandomColorJitter(SeededOperation):
    """RandomApply(ColorJitter(brightness, contrast, saturation, hue), p): hue included, random op order."""

    op, batch_fn = OP_JITTER, jitter_batch

    def __init__(self, view: int, p: float, brightness: float, contrast: float, saturation: float,
                 hue: float) -> None:
        super().__init__(view, *(float(v) for v in (p, brightness, contrast, saturation, hue)))


class RandomGrayscale(SeededOperation):
    """RandomGrayscale(p): luma in all three channels."""

    op, batch_fn = OP_GRAY, grayscale_batch

    def __init__(self, view: int, p: float) -> None:
        super().__init__(view, float(p))


class RandomGaussianBlur(SeededOperation):
    """RandomApply(GaussianBlur(sigma ~ U(sigma_lo, sigma_hi)), p), kernel 2 ceil(3 sigma) + 1 (MoCo's PIL blur
    has no kernel size; 3 sigma covers 99.7% of the mass)."""

    op, batch_fn = OP_BLUR, blur_batch

    def __init__(self, view: int, p: float, sigma_lo: float, sigma_hi: float) -> None:
        super().__init__(view, float(p), float(sigma_lo), float(sigma_hi))


class RandomSolarize(SeededOperation):
    """RandomApply(Solarize(threshold), p)."""

    op, batch_fn = OP_SOLARIZE, solarize_batch

    def __init__(self, view: int, p: float, threshold: int) -> None:
        super().__init__(view, float(p), int(threshold))


class ViewParams(Operation):
    """A decoder (of any field: it reads only the sample indices) that draws every view's colour choices for
    the device: float64 [B, V, P], view v's device_augment row in its first params_width(recipe v) columns,
    from the same keys as the CPU ops.

    With it the loader's threads only crop and flip; colour jitter, grayscale, blur and solarize run on
    the device (data/device_augment.py) and give the same bits.
    """

    def __init__(self, recipes: Sequence, resolution: int) -> None:
        super().__init__()
        self.recipes, self.resolution = tuple(recipes), resolution
        self.width = max(params_width(r) for r in self.recipes)
        self.centres = np.array([COL_WEIGHTS + blur_radius(r.blur_sigma_max) for r in self.recipes], np.int64)

    def declare_state_and_memory(self, previous_state: State):
        shape = (len(self.recipes), self.width)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype(np.float64)),
                (AllocationQuery(shape, np.dtype(np.float64)), _KEY_CELL))

    def generate_code(self):
        centres, max_radius = self.centres, self.resolution - 1
        salts = np.array([[salt(v, op) for op in (OP_JITTER, OP_GRAY, OP_BLUR, OP_SOLARIZE)]
                          for v in range(len(self.recipes))], np.uint64)
        probs = np.array([(r.jitter_p, r.brightness, r.contrast, r.saturation, r.hue, r.grayscale_p, r.blur_p,
                           r.blur_sigma_min, r.blur_sigma_max, r.solarize_p) for r in self.recipes], np.float64)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, cell = my_storage
            out = destination[:len(batch_indices)]
            for view in range(salts.shape[0]):
                view_params_batch(out, view, batch_indices, cell[0, 0], salts[view], probs[view], centres[view],
                                  max_radius)
            return out

        return decode


class Normalize(Operation):
    """uint8 -> float32 (v - mean) / std per channel, like FFCV's NormalizeImage on the CPU, but its loop is
    a cached module-level function (FFCV's is compiled again in every loader).

    A [B, H, W, 3] batch stays in that layout. A multi-view [B, V, H, W, 3] batch comes out view-major,
    [V, B, H, W, 3], so that each view is one contiguous channels-last batch without a copy.
    """

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.table = normalize_table(mean, std)  # the bits of DeviceNormalize on a GPU

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        self.views = previous_state.shape[0] if len(previous_state.shape) == 4 else 0
        state = replace(previous_state, jit_mode=True, dtype=np.dtype(np.float32))
        return state, AllocationQuery(previous_state.shape, np.dtype(np.float32))

    def generate_code(self):
        table, views = self.table, self.views

        def normalize_views(images, out):
            # View-major: [V, B, H, W, 3] in the first V * B slots of FFCV's [B, V, H, W, 3] buffer.
            b, _, h, w, c = images.shape
            view_major = out.reshape(-1)[:views * b * h * w * c].reshape((views, b, h, w, c))
            normalize_batch(images, view_major, table)
            return view_major

        def normalize(images, out):
            b, h, w, c = images.shape
            normalize_batch(images.reshape((b, 1, h, w, c)), out[:b].reshape((1, b, h, w, c)), table)
            return out[:b]

        return normalize_views if views else normalize


class SeededRandomResizedCrops(ResizedCropRGBImageDecoder):
    """FFCV's RandomResizedCropRGBImageDecoder for several views at once: each image is decoded once and
    cut into one crop per view, drawn from (seed, epoch, sample, view). Output: uint8 [B, V, H, W, 3].

    The decode loop is FFCV 1.0.2's ResizedCropRGBImageDecoder.generate_code (JPEG or raw read, then
    libffcv's resize_crop per view); only the crop parameters differ: random_resized_crop_params instead of
    get_random_crop's np.random draws. Its memory gains a key cell after FFCV's two buffers. ``crops`` holds
    one ``(scale, ratio)`` pair per view, view v salted with ``salt(v, OP_CROP)``.
    """

    def __init__(self, output_size: tuple[int, int],
                 crops: Sequence[tuple[tuple[float, float], tuple[float, float]]]) -> None:
        super().__init__(output_size)
        self.scales = np.array([scale for scale, _ in crops], np.float64).reshape(-1, 2)
        self.log_ratios = np.log(np.array([ratio for _, ratio in crops], np.float64)).reshape(-1, 2)
        self.salts = np.array([salt(v, OP_CROP) for v in range(len(crops))], np.uint64)

    @property
    def get_crop_generator(self):  # required by the abstract base; unused
        return None

    def declare_state_and_memory(self, previous_state: State):
        state, (_, temp) = super().declare_state_and_memory(previous_state)
        shape = (len(self.salts), *state.shape)
        return replace(state, shape=shape), (AllocationQuery(shape, state.dtype), temp, _KEY_CELL)

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        scales, log_ratios, salts = self.scales, self.log_ratios, self.salts

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, cell = my_storage
            base = cell[0, 0]
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                for v in range(len(salts)):
                    key = sample_key(base, source_ix, salts[v])
                    i, j, h, w = random_resized_crop_params(np.int64(height), np.int64(width), key, scales[v, 0],
                                                            scales[v, 1], log_ratios[v, 0], log_ratios[v, 1])
                    resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix, v])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


# ---------------------------------------------------------------------------------------------- loader


class _SeededEpochIterator(GuardedEpochIterator):
    """The loader's epoch iterator, which writes the epoch key into every seeded op's key cell before each batch."""

    def __init__(self, loader: SeededLoader, order, key: np.uint64) -> None:
        self.key = key
        self.cells = [node.id for node in loader.graph.nodes if _is_seeded(node)]
        super().__init__(loader, order)  # starts the thread: set everything it reads first

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        for node_id in self.cells:
            memory = self.memory_allocations["operation"][node_id]
            (memory[-1] if isinstance(memory, tuple) else memory)[batch_slot] = self.key
        return super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)


def _is_seeded(node) -> bool:
    op = getattr(node, "operation", None) or getattr(node, "decoder", None)
    return isinstance(op, (SeededOperation, SeededRandomResizedCrops, ViewParams))


class SeededLoader(GuardedLoader):
    """A guarded FFCV loader (data/loader_thread.py) whose seeded operations see ``epoch_key(seed, epoch)``:
    same seed, same views. ``next_epoch`` (settable, as on Loader) picks the epoch, so a resumed run gets the
    same order and views.
    """

    def epoch_iterator(self, order, epoch: int) -> _SeededEpochIterator:
        return _SeededEpochIterator(self, order, epoch_key(self.seed, epoch))


name_kernels(globals())  # stages capturing these kernels can then be cached (data/ffcv_compile.py)
