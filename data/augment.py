"""Seeded per-image SSL augmentations in FFCV: the operations that run the ops of data/ops/ and the loader that
keys them.

Why not FFCV's own RandomResizedCrop / RandomHorizontalFlip / colour ops
-------------------------------------------------------------------------
FFCV 1.0.2 draws their random parameters from numba's per-thread generators (``np.random`` inside jitted
code), seeded from OS entropy, and its colour jitter has no hue. Here every random number is a pure function
of ``(seed, epoch, sample index, view, op, draw)``, hashed with splitmix64 (a counter-based generator,
data/ops/base.py), so:

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
cache next to their files) and loaded in later processes; the wrappers are cached too (data/ffcv_compile.py).
Only the decoders (they call FFCV's C code through ctypes) and FFCV's glue are compiled per process.

Views: SeededRandomResizedCrops decodes each image once and cuts all its views into a [B, V, H, W, 3]
batch; every later op acts on its own view ``images[:, v]``. On a GPU (data.loaders' ``device_ops``) the
loader's threads run only the ops without params columns (the flip): ViewParams records the others' choices
with the same keys, and data/device_augment.py applies them there with the same bits, since every stage is
compiled without fast-math (data/ffcv_compile.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from numba import prange

from data.ffcv_compile import name_kernels
from data.loader_thread import GuardedEpochIterator, GuardedLoader
from data.normalize import normalize_table
from data.ops import Op, params_width, recipe_ops
from data.ops.base import KEY_CELL, epoch_key, kernel, parallel, salt
from data.ops.crop import SeededRandomResizedCrops


class SeededOperation(Operation):
    """Op ``op`` in place on view ``view`` of a [B, V, H, W, 3] batch, with constant parameters ``args``: its
    ``batch`` loop, its random choices keyed by (seed, epoch, sample, view, op).

    Its memory is one key cell per sample slot, filled by SeededLoader (see the module docstring).
    """

    def __init__(self, op: Op, view: int, args: tuple) -> None:
        super().__init__()
        self.batch, self.view, self.salt, self.args = op.impl.batch, view, np.uint64(salt(view, op.code)), args

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        return replace(previous_state, jit_mode=True), KEY_CELL

    def generate_code(self):
        batch_fn, view, salt_, args = self.batch, self.view, self.salt, self.args

        def seeded_op(images, cell, indices):
            batch_fn(images, view, indices, cell[0, 0], salt_, *args)
            return images

        seeded_op.with_indices = True
        return seeded_op


class ViewParams(Operation):
    """The choices of every view's ops with params columns, for the device (data.loaders' ``device_ops``): a
    transform after any decoder (it reads only the sample indices) into float64 [B, V, P], view v's params row
    (data/ops/__init__.py) in its first params_width(recipe v) columns, written by each op's ``record``.
    ``resolution``: the views' side.

    Plain Python, not a compiled stage: it calls each op's cached ``record`` (one per op and view), so FFCV's
    per-loader glue links none of them.
    """

    def __init__(self, recipes: Sequence, resolution: int) -> None:
        super().__init__()
        self.recipes, self.resolution = tuple(recipes), resolution
        self.width = max(params_width(r) for r in self.recipes)

    def declare_state_and_memory(self, previous_state: State):
        shape = (len(self.recipes), self.width)
        return (replace(previous_state, jit_mode=False, shape=shape, dtype=np.dtype(np.float64)),
                (AllocationQuery(shape, np.dtype(np.float64)), KEY_CELL))

    def generate_code(self):
        side = self.resolution
        steps = [(v, op.impl.record, np.uint64(salt(v, op.code)), args)
                 for v, recipe in enumerate(self.recipes) for op, args in recipe_ops(recipe) if op.columns]

        def view_params(_, memory, indices):
            out, cell = memory
            out[:] = 0.0
            for view, record, salt_, args in steps:
                record(out[:, view], indices, cell[0, 0], salt_, side, *args)
            return out

        view_params.with_indices = True
        return view_params


@kernel
def _normalize(src, dst, table):
    """One uint8 [H, W, 3] image -> float32 via a [256, 3] table of (v - mean) / std (NormalizeImage's way)."""
    src, dst = src.reshape(-1, 3), dst.reshape(-1, 3)
    for i in range(src.shape[0]):
        for c in range(3):
            dst[i, c] = table[src[i, c], c]


@parallel
def normalize_batch(images, out, table):
    """uint8 [B, V, H, W, 3] -> float32 view-major [V, B, H, W, 3]."""
    for n in prange(images.shape[0]):
        for v in range(images.shape[1]):
            _normalize(images[n, v], out[v, n], table)


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
