"""What every op file uses: numba's decorators, the counter-based random numbers and the key cell.

Every random number is a pure function of ``(seed, epoch, sample index, view, op, draw)``, hashed with
splitmix64 (why, and how an op learns the epoch: data/augment.py). An op keys image n with
``sample_key(base, index, salt(view, code))``; draw 0 of that key is its RandomApply coin (``applies``), draws
1 and up its parameters, so the loader's ``batch`` and the device's ``record`` of an op make the same choices.
"""

from __future__ import annotations

import numpy as np
from ffcv.pipeline.allocation_query import AllocationQuery
from numba import njit

from data.ffcv_compile import name_kernels

# Compiled once per machine (numba's on-disk cache); error_model "numpy" drops the division-by-zero checks
# that would stop LLVM from vectorising the pixel loops; nogil: ViewParams calls ``record`` from Python.
kernel = njit(cache=True, error_model="numpy", nogil=True)
parallel = njit(cache=True, error_model="numpy", parallel=True)

# The epoch key's cell: one uint64 per sample slot, written by SeededLoader before each batch.
KEY_CELL = AllocationQuery((1,), np.dtype("<u8"))

# uint8's range in float32: the clamp of torchvision's kernels.
F0, F255 = np.float32(0.0), np.float32(255.0)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TWO_M53 = 1.0 / 9007199254740992.0


@kernel
def mix64(z):
    """splitmix64's finaliser: a bijective 64-bit hash (all arithmetic in uint64, wrapping)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@kernel
def sample_key(base, sample, salt):
    """Key of one image in one op of one view: hash of the epoch key, the sample index and the salt."""
    return mix64(base ^ mix64(np.uint64(sample) * _GOLDEN + np.uint64(salt)))


@kernel
def uniform(key, j):
    """The j-th uniform float64 in [0, 1) of ``key`` (53 random bits)."""
    return np.float64(mix64(key + np.uint64(j + 1) * _GOLDEN) >> _S11) * _TWO_M53


@kernel
def applies(key, p):
    """RandomApply's coin with probability ``p``: draw 0 of an op's key."""
    return uniform(key, 0) < p


@kernel
def _epoch_key(seed, epoch):
    return mix64(mix64(seed) ^ (epoch * _GOLDEN))


def epoch_key(seed: int, epoch: int) -> np.uint64:
    """The key every seeded op of an epoch starts from: a hash of (seed, epoch)."""
    return np.uint64(_epoch_key(np.uint64(seed % 2**64), np.uint64(epoch)))


def salt(view: int, op: int) -> int:
    """Salt of ``op`` (an OP_* code of data/ops/__init__.py) in view number ``view``."""
    return view * 16 + op


name_kernels(globals())  # stages capturing these kernels can then be cached (data/ffcv_compile.py)
