"""data/device_augment.py: each batched torch op against its numba kernel in data/ops/ applied image by image,
with a different random parameter per image. Equality is exact (same uint8 bits), on the CPU and, where one
is present, on a CUDA device.

Images: Fashion-MNIST at 32 px RGB (gray, real), random noise, and colourful gradients (hue and saturation
need colour), at 32x32 and 24x40; blur also on a 5x9 batch, smaller than its kernel.
"""

from __future__ import annotations

import math
from dataclasses import replace

import augment_kernels as A
import numpy as np
import pytest
import torch

from data import device_augment as D
from data.convert import to_rgb32
from data.fashion_mnist import load_fashion_mnist
from data.recipes import MOCO_V3_VIEWS, SIMCLR_VIEW, ViewRecipe

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
K = D.blur_radius(2.0)  # 6: the recipes' blur_sigma_max


def _gradients(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Smooth colourful images: each channel a sinusoid of a random direction, frequency and phase."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        for c in range(3):
            a, b = rng.uniform(-2, 2, 2)
            wave = np.sin(2 * np.pi * (a * xx + b * yy + rng.uniform()))
            out[i, :, :, c] = np.round(127.5 + 127.5 * wave).clip(0, 255)
    return out


@pytest.fixture(scope="module")
def batches() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    fashion = to_rgb32(load_fashion_mnist("test")[0][:8])
    square = np.concatenate([fashion, rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
                             _gradients(rng, 8, 32, 32)])
    wide = np.concatenate([rng.integers(0, 256, (8, 24, 40, 3), dtype=np.uint8), _gradients(rng, 8, 24, 40)])
    return {"square": square, "wide": wide}


@pytest.fixture(params=["square", "wide"])
def batch(request, batches) -> np.ndarray:
    return batches[request.param]


def _numba(batch: np.ndarray, kernel, *per_image) -> np.ndarray:
    """The numba kernel on a copy of each image, with image n's own arguments (arrays indexed by n)."""
    out = batch.copy()
    for n in range(len(out)):
        kernel(out[n], *(a[n] for a in per_image))
    return out


def _torch(fn, batch: np.ndarray, device: str, *args) -> np.ndarray:
    x = torch.from_numpy(batch).to(device)
    y = fn(x, *args)
    assert y.dtype == torch.uint8 and y.shape == x.shape
    np.testing.assert_array_equal(x.cpu().numpy(), batch)  # input untouched
    return y.cpu().numpy()


def _factors(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    return rng.uniform(lo, hi, n)


def _padded_weights(sigmas: np.ndarray, h: int, w: int, k: int = K) -> np.ndarray:
    """Per-image blur weights [B, 2k + 1]: gaussian_kernel(sigma, r) centred at k, r clipped as numba does."""
    out = np.zeros((len(sigmas), 2 * k + 1), np.float32)
    for n, sigma in enumerate(sigmas):
        r = min(A.blur_radius(sigma), h - 1, w - 1)
        out[n, k - r:k + r + 1] = A.gaussian_kernel(sigma, r)
    return out


OPS = [("brightness", A.adjust_brightness, D.adjust_brightness, 0.2, 1.8),
       ("contrast", A.adjust_contrast, D.adjust_contrast, 0.2, 1.8),
       ("saturation", A.adjust_saturation, D.adjust_saturation, 0.2, 1.8),
       ("hue", A.adjust_hue, D.adjust_hue, -0.5, 0.5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "kernel", "op", "lo", "hi"), OPS, ids=[o[0] for o in OPS])
def test_colour_ops_are_bit_exact(batch, device, name, kernel, op, lo, hi):
    rng = np.random.default_rng(sum(map(ord, name)))  # a fixed seed per op
    for _ in range(3):
        factors = _factors(rng, len(batch), lo, hi)
        factors[:2] = lo, hi  # the ends of the range too
        mine = _torch(op, batch, device, torch.from_numpy(factors))
        np.testing.assert_array_equal(mine, _numba(batch, kernel, factors), err_msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_grayscale_and_solarize_are_bit_exact(batch, device):
    np.testing.assert_array_equal(_torch(D.to_grayscale, batch, device), _numba(batch, A.to_grayscale))
    for threshold in (0, 1, 128, 128.5, 255, 256):
        thresholds = np.full(len(batch), threshold)
        np.testing.assert_array_equal(_torch(D.solarize, batch, device, threshold),
                                      _numba(batch, A.solarize, thresholds))


@pytest.mark.parametrize("device", DEVICES)
def test_blur_with_per_image_kernels_is_bit_exact(batches, device):
    rng = np.random.default_rng(1)
    tiny = rng.integers(0, 256, (6, 5, 9, 3), dtype=np.uint8)  # radius clipped to 4 by numba, K = 6 here
    for batch in (batches["square"], batches["wide"], tiny):
        sigmas = _factors(rng, len(batch), 0.1, 2.0)
        sigmas[:3] = 0.1, 2.0, 1.0 / 3.0  # smallest and largest kernel, and ceil(3 sigma) at an integer
        h, w = batch.shape[1:3]
        weights = torch.from_numpy(_padded_weights(sigmas, h, w))
        radii = np.array([A.blur_radius(s) for s in sigmas])
        mine = _torch(D.gaussian_blur, batch, device, weights)
        np.testing.assert_array_equal(mine, _numba(batch, A.gaussian_blur, sigmas, radii))


def _key(base: np.uint64, sample: int, view: int, op: int) -> np.uint64:
    """sample_key as the batch loops use it (numba hands a uint64 back to Python as an int: re-wrap it)."""
    return np.uint64(A.sample_key(base, sample, A.salt(view, op)))


def _jitter_draws(n: int, recipe: ViewRecipe, base: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    keys = [_key(base, i, 0, A.OP_JITTER) for i in range(n)]
    draws = [A.jitter_params(k, recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue) for k in keys]
    return np.stack([o for o, _ in draws]), np.stack([f for _, f in draws])


def _strengths(recipe: ViewRecipe) -> tuple[float, float, float, float]:
    return recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", [SIMCLR_VIEW, MOCO_V3_VIEWS[0]], ids=["simclr", "moco"])
def test_color_jitter_with_per_image_orders_is_bit_exact(batch, device, recipe):
    order, factors = _jitter_draws(len(batch), recipe, A.epoch_key(3, 0))
    assert len({tuple(o) for o in order}) > 5  # the orders really differ between images
    expected = _numba(batch, lambda img, o, f: A.color_jitter(img, o, f, *_strengths(recipe)), order, factors)
    mine = _torch(D.color_jitter, batch, device, torch.from_numpy(order), torch.from_numpy(factors), recipe)
    np.testing.assert_array_equal(mine, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_strength_jitter_ops_are_skipped(batches, device):
    batch = batches["square"]
    recipe = ViewRecipe(jitter_p=1.0, brightness=0.4, contrast=0.0, saturation=0.3, hue=0.0)
    rng = np.random.default_rng(2)
    order = np.stack([rng.permutation(4) for _ in range(len(batch))])
    factors = np.stack([rng.uniform(0.2, 1.8, len(batch)) for _ in range(3)] + [rng.uniform(-0.5, 0.5, len(batch))],
                       axis=1)
    expected = _numba(batch, lambda img, o, f: A.color_jitter(img, o, f, *_strengths(recipe)), order, factors)
    args = torch.from_numpy(order), torch.from_numpy(factors)
    mine = _torch(D.color_jitter, batch, device, *args, recipe)
    np.testing.assert_array_equal(mine, expected)
    # the skipped ops would have changed the images: with all four strengths on, the result differs
    full = _torch(D.color_jitter, batch, device, *args, replace(recipe, contrast=0.4, hue=0.1))
    assert (full != mine).any()
    # ... and with all four off, nothing changes
    off = _torch(D.color_jitter, batch, device, *args, ViewRecipe())
    np.testing.assert_array_equal(off, batch)


def _view_params(recipe: ViewRecipe, view: int, indices: np.ndarray, base: np.uint64, h: int, w: int):
    """params rows drawn as the jitter / grayscale / blur / solarize batch loops of data/ops/ draw them, and the
    numba reference: those kernels applied per image in the recipe's order with the same decisions."""
    k = D.blur_radius(recipe.blur_sigma_max)
    params = np.zeros((len(indices), D.params_width(recipe)))
    steps: list[list] = [[] for _ in indices]
    strengths = _strengths(recipe)
    for n, sample in enumerate(indices):
        key = _key(base, sample, view, A.OP_JITTER)
        if A.uniform(key, 0) < recipe.jitter_p:
            order, factors = A.jitter_params(key, *strengths)
            params[n, D.COL_JITTER], params[n, D.COL_ORDER], params[n, D.COL_FACTORS] = 1.0, order, factors
            steps[n].append(lambda img, o=order, f=factors: A.color_jitter(img, o, f, *strengths))
        if A.uniform(_key(base, sample, view, A.OP_GRAY), 0) < recipe.grayscale_p:
            params[n, D.COL_GRAY] = 1.0
            steps[n].append(A.to_grayscale)
        key = _key(base, sample, view, A.OP_BLUR)
        if A.uniform(key, 0) < recipe.blur_p:
            sigma = recipe.blur_sigma_min + (recipe.blur_sigma_max - recipe.blur_sigma_min) * A.uniform(key, 1)
            params[n, D.COL_BLUR] = 1.0
            params[n, D.COL_WEIGHTS:] = _padded_weights(np.array([sigma]), h, w, k)[0]
            steps[n].append(lambda img, s=sigma: A.gaussian_blur(img, s, math.ceil(3.0 * s)))
        if A.uniform(_key(base, sample, view, A.OP_SOLARIZE), 0) < recipe.solarize_p:
            params[n, D.COL_SOLARIZE] = 1.0
            steps[n].append(lambda img: A.solarize(img, recipe.solarize_threshold))
    return params, steps


def _reference_view(batch: np.ndarray, steps) -> np.ndarray:
    out = batch.copy()
    for img, ops in zip(out, steps, strict=True):
        for op in ops:
            op(img)
    return out


VIEW_RECIPES = [replace(MOCO_V3_VIEWS[1], grayscale_p=0.3, blur_p=0.5, solarize_p=0.5),
                replace(SIMCLR_VIEW, blur_sigma_max=1.5, solarize_p=0.3, solarize_threshold=200), MOCO_V3_VIEWS[0]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", VIEW_RECIPES, ids=["moco2-boosted", "simclr-solarize", "moco1"])
def test_apply_view_matches_the_numba_ops_in_order(batch, device, recipe):
    h, w = batch.shape[1:3]
    params, steps = _view_params(recipe, 1, np.arange(len(batch)) * 7 + 3, A.epoch_key(11, 2), h, w)
    assert params.shape == (len(batch), D.params_width(recipe))
    probabilities = (recipe.jitter_p, recipe.grayscale_p, recipe.blur_p, recipe.solarize_p)
    for col, p in zip((D.COL_JITTER, D.COL_GRAY, D.COL_BLUR, D.COL_SOLARIZE), probabilities, strict=True):
        assert params[:, col].any() == (p > 0) and params[:, col].all() == (p == 1)  # a mix where 0 < p < 1
    mine = _torch(D.apply_view, batch, device, torch.from_numpy(params), recipe)
    np.testing.assert_array_equal(mine, _reference_view(batch, steps))


def test_params_width_and_bad_params():
    assert all(D.blur_radius(s) == A.blur_radius(s) for s in (0.1, 1 / 3, 0.5, 1.5, 2.0))
    assert D.params_width(MOCO_V3_VIEWS[0]) == 12 + 2 * 6 + 1
    assert D.params_width(replace(SIMCLR_VIEW, blur_sigma_max=1.5)) == 12 + 2 * 5 + 1
    x = torch.zeros((2, 8, 8, 3), dtype=torch.uint8)
    with pytest.raises(ValueError, match="params must be"):
        D.apply_view(x, torch.zeros((2, 12)), MOCO_V3_VIEWS[0])


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_view_slice(batches, device):
    batch = batches["wide"]
    rng = np.random.default_rng(4)
    both = np.stack([rng.integers(0, 256, batch.shape, dtype=np.uint8), batch], axis=1)  # [B, 2, H, W, 3]
    x5 = torch.from_numpy(both.copy()).to(device)
    x = x5[:, 1]
    assert not x.is_contiguous()
    b, h, w = batch.shape[:3]
    for _, kernel, op, lo, hi in OPS:
        f = rng.uniform(lo, hi, b)
        np.testing.assert_array_equal(op(x, torch.from_numpy(f)).cpu().numpy(), _numba(batch, kernel, f))
    np.testing.assert_array_equal(D.to_grayscale(x).cpu().numpy(), _numba(batch, A.to_grayscale))
    np.testing.assert_array_equal(D.solarize(x, 128).cpu().numpy(), _numba(batch, A.solarize, np.full(b, 128)))
    sigmas = rng.uniform(0.1, 2.0, b)
    np.testing.assert_array_equal(D.gaussian_blur(x, torch.from_numpy(_padded_weights(sigmas, h, w))).cpu().numpy(),
                                  _numba(batch, A.gaussian_blur, sigmas, [A.blur_radius(s) for s in sigmas]))
    recipe = VIEW_RECIPES[0]
    params, steps = _view_params(recipe, 1, np.arange(b), A.epoch_key(5, 0), h, w)
    np.testing.assert_array_equal(D.apply_view(x, torch.from_numpy(params), recipe).cpu().numpy(),
                                  _reference_view(batch, steps))
    np.testing.assert_array_equal(x5.cpu().numpy(), both)  # neither view was written
