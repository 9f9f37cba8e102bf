"""data/ops/: each numba kernel against torchvision.transforms.v2.functional on the same uint8 image with the
same parameters, and the seeded random draws.

Tolerance: max |difference| <= 1 grey level per pixel (``TOL``). The kernels repeat torchvision's float32
arithmetic and its truncation / rounding points, so most outputs are identical; what remains is float rounding
order (a separable blur instead of a 2-D convolution, one reciprocal instead of three divisions in hue, FMA
contraction), which can move a value across an integer boundary and so change a truncated or rounded level by
one. Solarize, flip and grayscale are exact.
"""

from __future__ import annotations

import augment_kernels as A
import numpy as np
import pytest
import torch

import trainers  # noqa: F401  (the torchvision shim, before torchvision is imported)
from data.fashion_mnist import load_fashion_mnist
from data.image_folder import load_image, make_synthetic_folder

F = pytest.importorskip("torchvision.transforms.v2.functional")
TOL = 1


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[np.ndarray]:
    """Real-looking colour images: 6 tinted Fashion-MNIST 32 px images, 2 synthetic photos, 1 random noise."""
    grey = load_fashion_mnist("test")[0][:6]
    rng = np.random.default_rng(0)
    tints = rng.uniform(0.3, 1.0, (6, 1, 1, 3))
    small = [np.pad((g[..., None] * t).astype(np.uint8), ((2, 2), (2, 2), (0, 0))) for g, t in zip(grey, tints,
                                                                                                   strict=True)]
    root = make_synthetic_folder(tmp_path_factory.mktemp("photos"), per_class=1, classes=2, sizes=(40, 64))
    photos = [load_image(p, None) for p in sorted(root.rglob("*.jpg"))]
    return [*small, *photos, rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)]


def _reference(img: np.ndarray, fn, *args) -> np.ndarray:
    chw = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    return fn(chw, *args).permute(1, 2, 0).numpy()


def _mine(img: np.ndarray, fn, *args) -> np.ndarray:
    out = np.ascontiguousarray(img).copy()
    fn(out, *args)
    return out


def _max_diff(images, mine, theirs, *args) -> int:
    return max(int(np.abs(_mine(im, mine, *args).astype(int) - _reference(im, theirs, *args)).max()) for im in images)


@pytest.mark.parametrize("factor", [0.0, 0.6, 1.0, 1.37, 1.8])
def test_brightness_contrast_saturation_match_torchvision(images, factor):
    assert _max_diff(images, A.adjust_brightness, F.adjust_brightness, factor) <= TOL
    assert _max_diff(images, A.adjust_contrast, F.adjust_contrast, factor) <= TOL
    assert _max_diff(images, A.adjust_saturation, F.adjust_saturation, factor) <= TOL


@pytest.mark.parametrize("hue", [-0.5, -0.2, -0.07, 0.0, 0.03, 0.1, 0.5])
def test_hue_matches_torchvision(images, hue):
    assert _max_diff(images, A.adjust_hue, F.adjust_hue, hue) <= TOL


def test_grayscale_solarize_flip_are_exact(images):
    for im in images:
        np.testing.assert_array_equal(_mine(im, A.to_grayscale), _reference(im, F.rgb_to_grayscale, 3))
        np.testing.assert_array_equal(_mine(im, A.hflip), _reference(im, F.horizontal_flip))
        for threshold in (0, 128, 200):
            np.testing.assert_array_equal(_mine(im, A.solarize, threshold), _reference(im, F.solarize, threshold))


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 1.7, 2.0])
def test_gaussian_blur_matches_torchvision(images, sigma):
    r = A.blur_radius(sigma)
    for im in images:
        mine = _mine(im, A.gaussian_blur, sigma, r)
        ref = _reference(im, F.gaussian_blur, [2 * r + 1] * 2, [sigma, sigma])
        assert np.abs(mine.astype(int) - ref).max() <= TOL
    kernel = A.gaussian_kernel(1.3, 4)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-6) and np.allclose(kernel, kernel[::-1])


def test_color_jitter_with_known_order_matches_torchvision(images):
    order, factors = A.jitter_params(np.uint64(12345), 0.4, 0.4, 0.2, 0.1)
    assert sorted(order) == [0, 1, 2, 3]
    assert 0.6 <= factors[0] <= 1.4 and 0.6 <= factors[1] <= 1.4 and 0.8 <= factors[2] <= 1.2
    assert -0.1 <= factors[3] <= 0.1
    fns = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    for im in images:
        ref = torch.from_numpy(im.copy()).permute(2, 0, 1).contiguous()
        for op in order:
            ref = fns[op](ref, float(factors[op]))
        mine = _mine(im, A.color_jitter, order, factors, 0.4, 0.4, 0.2, 0.1)
        # Four ops in a row: each may be one level off and the next can carry it, so allow 2 here.
        assert np.abs(mine.astype(int) - ref.permute(1, 2, 0).numpy()).max() <= 2 * TOL


def test_random_draws_are_pure_uniform_and_independent():
    keys = [np.uint64(A.sample_key(A.epoch_key(7, 0), i, A.salt(0, A.OP_FLIP))) for i in range(4000)]
    u = np.array([A.uniform(k, 0) for k in keys])
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.02 and abs(u.var() - 1 / 12) < 0.005
    assert A.sample_key(A.epoch_key(7, 0), 5, 2) == A.sample_key(A.epoch_key(7, 0), 5, 2)
    distinct = {A.sample_key(A.epoch_key(s, e), 5, A.salt(v, A.OP_CROP))
                for s in (0, 1) for e in (0, 1) for v in (0, 1)}
    assert len(distinct) == 8  # seed, epoch and view each change the key


def test_random_resized_crop_params_follow_torchvision_rules():
    for n in range(300):
        key = np.uint64(A.sample_key(A.epoch_key(1, 0), n, 1))
        i, j, h, w = A.random_resized_crop_params(40, 60, key, 0.08, 1.0, np.log(3 / 4), np.log(4 / 3))
        assert i >= 0 and j >= 0 and i + h <= 40 and j + w <= 60 and h > 0 and w > 0
        assert 0.08 * 2400 * 0.7 <= h * w <= 2400
    # An impossible scale falls back to the (ratio-clipped) centre crop, as torchvision does.
    assert A.random_resized_crop_params(10, 100, np.uint64(3), 1.0, 1.0, np.log(3 / 4), np.log(4 / 3)) == \
        (0, (100 - 13) // 2, 10, 13)
