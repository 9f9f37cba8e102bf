"""RandomResizedCrop(scale=(crop_min, crop_max), ratio=(ratio_min, ratio_max)) of every view: the decoder that makes
the views, one decode per image."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State

from data.ops import OP_CROP
from data.ops.base import KEY_CELL, kernel, name_kernels, salt, sample_key, uniform


def args(r) -> tuple[tuple[float, float], tuple[float, float]]:
    """The crop of one view: (scale, ratio) ranges."""
    return (r.crop_min, r.crop_max), (r.ratio_min, r.ratio_max)


@kernel
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


class SeededRandomResizedCrops(ResizedCropRGBImageDecoder):
    """FFCV's RandomResizedCropRGBImageDecoder for several views at once: each image is decoded once and
    cut into one crop per view, drawn from (seed, epoch, sample, view). Output: uint8 [B, V, H, W, 3].

    The decode loop is FFCV 1.0.2's ResizedCropRGBImageDecoder.generate_code (JPEG or raw read, then
    libffcv's resize_crop per view); only the crop parameters differ: random_resized_crop_params instead of
    get_random_crop's np.random draws. Its memory gains a key cell after FFCV's two buffers. View v follows
    ``recipes[v]`` (ViewRecipes), salted with ``salt(v, OP_CROP)``.
    """

    def __init__(self, output_size: tuple[int, int], recipes: Sequence) -> None:
        super().__init__(output_size)
        crops = [args(r) for r in recipes]
        self.scales = np.array([scale for scale, _ in crops], np.float64).reshape(-1, 2)
        self.log_ratios = np.log(np.array([ratio for _, ratio in crops], np.float64)).reshape(-1, 2)
        self.salts = np.array([salt(v, OP_CROP) for v in range(len(crops))], np.uint64)

    @property
    def get_crop_generator(self):  # required by the abstract base; unused
        return None

    def declare_state_and_memory(self, previous_state: State):
        state, (_, temp) = super().declare_state_and_memory(previous_state)
        shape = (len(self.salts), *state.shape)
        return replace(state, shape=shape), (AllocationQuery(shape, state.dtype), temp, KEY_CELL)

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


name_kernels(globals())
