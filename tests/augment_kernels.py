"""Every op's numba kernels and seeded draws (data/ops/) in one namespace, as tests/test_augment.py and
tests/test_device_augment.py call them: ``A.<name>``."""
# ruff: noqa: F401  (imported to be read from here)

from data.ops import OP_BLUR, OP_CROP, OP_FLIP, OP_GRAY, OP_JITTER, OP_SOLARIZE, blur_radius
from data.ops.base import epoch_key, salt, sample_key, uniform
from data.ops.blur import gaussian_blur, gaussian_kernel
from data.ops.crop import random_resized_crop_params
from data.ops.flip import hflip
from data.ops.grayscale import to_grayscale
from data.ops.jitter import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    jitter_params,
)
from data.ops.solarize import solarize
