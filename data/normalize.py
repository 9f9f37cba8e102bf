"""Image normalisation, (v - mean) / std per channel in float32, the same bits on the host and on the device.

Two places normalise, chosen by the device (data.loaders): on the CPU the loader's numba threads look each
uint8 value up in ``normalize_table`` (torch's threads stay with the model); on a GPU the batch travels as
uint8, a quarter of the float32 bytes, and ``DeviceNormalize`` does the same float32 arithmetic there.
Importing this module needs only torch and numpy (bench/gpu_checks.py runs it where FFCV is absent).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def normalize_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 [256, 3]: entry [v, c] is (v - mean[c]) / std[c], computed in float32 like DeviceNormalize."""
    values = np.arange(256, dtype=np.float32)[:, None]
    return (values - np.asarray(mean, np.float32)[None]) / np.asarray(std, np.float32)[None]


class DeviceNormalize:
    """uint8 [B, H, W, 3] (any strides) on the device -> float32 [B, 3, H, W] channels_last, (v - mean) / std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str) -> None:
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1)
                               for v in (mean, std))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)
