"""The augmentation ops of a view, one file each in this package, and the params row the device reads.

An op's file holds all of it on the loader's side, each random draw made in one function there:

- ``args(recipe)``: its constant parameters from a ViewRecipe, None where the recipe turns it off;
- its numba pixel kernels;
- ``batch(images, view, indices, base, salt, *args)``: applies it in place to view ``view`` of a uint8
  [B, V, H, W, 3] batch, in the loader's threads;
- for an op with params columns, ``record(rows, indices, base, salt, side, *args)``: writes the same draws into
  its columns of one view's float64 [B, P] rows (``side``: the views' side in pixels), which its torch twin in
  data/device_augment.py applies with the same bits.

The crop is the decoder and cuts every view (crop.py); base.py holds what all share: the random numbers, the
key cell, numba's decorators.

This file lists the ops in a view's order with each one's salt code and params columns, and derives the
columns' numbers: numba and FFCV are not imported here, since data/device_augment.py reads the layout where
neither is installed (bench/gpu_checks.py). A new op: its file, an entry in OPS, its ViewRecipe fields.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from itertools import pairwise

# Salt codes, mixed into every key of an op: fixed for good (another code, other views for the same seed), and
# below 16 (base.salt).
OP_CROP, OP_FLIP, OP_JITTER, OP_GRAY, OP_BLUR, OP_SOLARIZE = range(1, 7)


@dataclass(frozen=True)
class Op:
    name: str  # its file in this package
    code: int  # its salt code
    columns: tuple[tuple[str, int], ...] = ()  # its params columns (name, width); none: it runs on the host

    @property
    def impl(self):
        """Its file's module (it imports numba)."""
        return importlib.import_module(f"{__name__}.{self.name}")


OPS = (
    Op("flip", OP_FLIP),
    Op("jitter", OP_JITTER, (("jitter", 1), ("order", 4), ("factors", 4))),  # applied, order, factors
    Op("grayscale", OP_GRAY, (("gray", 1),)),
    Op("blur", OP_BLUR, (("blur", 1),)),  # and the kernel weights after every fixed column (COL_WEIGHTS)
    Op("solarize", OP_SOLARIZE, (("solarize", 1),)),
)
# The device applies its ops after the host's: no host op may follow one with columns.
assert all(b.columns for a, b in pairwise(OPS) if a.columns)


def recipe_ops(recipe) -> list[tuple[Op, tuple]]:
    """The ops ``recipe`` (a ViewRecipe) turns on, in order, each with its constant parameters."""
    return [(op, args) for op in OPS if (args := op.impl.args(recipe)) is not None]


def _layout() -> tuple[dict[str, int | slice], int]:
    at, columns = 0, {}
    for op in OPS:
        for name, width in op.columns:
            columns[name] = at if width == 1 else slice(at, at + width)
            at += width
    return columns, at


# One float64 row per image and view: each column's index (a slice where it is wider than one), then from
# COL_WEIGHTS blur's 2K + 1 kernel weights, K = blur_radius(recipe.blur_sigma_max) (device_augment.gaussian_blur).
COLUMNS, COL_WEIGHTS = _layout()


def blur_radius(sigma: float) -> int:
    """Half-width of the blur kernel: ceil(3 sigma), so kernel_size = 2 * ceil(3 sigma) + 1 (13 at sigma 2).
    blur.py compiles this same function for its draws."""
    return math.ceil(3.0 * sigma)


def params_width(recipe) -> int:
    """Columns of one image's params row for ``recipe`` (a ViewRecipe): COL_WEIGHTS + the 2K + 1 blur weights."""
    return COL_WEIGHTS + 2 * blur_radius(recipe.blur_sigma_max) + 1
