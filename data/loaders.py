"""FFCV loaders: multi-view batches for self-supervised training and centre-cropped batches for evaluation.

Two things every caller must know about FFCV loaders:

- Batches live in buffers that FFCV reuses a few batches later: clone anything kept beyond the next batch
  (kNN banks, labels collected over an epoch).
- numba compiles the pipelines when a loader is first iterated (about 17 s for two 32 px views on 2 cores,
  paid again by every new loader, never cached on disk): build each loader once per process and iterate
  the same loader every epoch.
- FFCV sets torch's intra-op thread count to ``num_workers`` whenever a loader is built or iterated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

from data.convert import read_metadata


@dataclass(frozen=True)
class ViewRecipe:
    """How one augmented view of an image is made (colour jitter, blur and solarize will join here)."""

    crop_min: float = 0.08  # RandomResizedCrop scale=(crop_min, 1); 0.08 for ViT in MoCo v3
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.crop_min <= 1:
            raise ValueError(f"crop_min must be in (0, 1], got {self.crop_min}")
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")


MOCO_V3_VIEWS: tuple[ViewRecipe, ViewRecipe] = (ViewRecipe(), ViewRecipe())


def _normalize(meta: dict) -> NormalizeImage:
    """FFCV's NormalizeImage with the dataset's own statistics.

    On a CPU pipeline it is a numba op on uint8 HWC arrays, so it must come before ToTensor (its GPU variant
    needs cupy, which is not installed); it turns uint8 into float32 in the same pass.
    """
    mean, std = (np.asarray(meta[k], dtype=np.float32) for k in ("mean", "std"))
    return NormalizeImage(mean, std, np.float32)


def _to_device(device: torch.device) -> list[Operation]:
    """ToDevice, or nothing on the CPU.

    On the CPU it would only add a torch copy per batch, and torch's spinning OpenMP threads then fight
    numba's for the cores: on 2 cores two-view throughput was then often about 10k images/s, not 50k.
    """
    return [] if device.type == "cpu" else [ToDevice(device, non_blocking=True)]


def _to_torch(device: torch.device) -> list[Operation]:
    """numpy HWC float32 batch -> [B, 3, H, W] channels_last tensor on ``device``."""
    return [ToTensor(), *_to_device(device), ToTorchImage(channels_last=True)]


def _label_ops(device: torch.device) -> list[Operation]:
    """What follows IntDecoder: its [B, 1] int64 array -> [B] tensor on ``device``."""
    # Squeeze dim 1 only, so a batch of one stays [1].
    return [ToTensor(), *_to_device(device), Squeeze(1)]


def _check_args(path: Path, meta: dict, batch_size: int, resolution: int, indices: Sequence[int] | None,
                distributed: bool) -> None:
    if batch_size < 1 or resolution < 1:
        raise ValueError(f"batch_size and resolution must be positive, got {batch_size}, {resolution}")
    if indices is not None:
        idx = np.asarray(indices)
        # FFCV does not check indices: out-of-range ones read past the sample table.
        if idx.ndim != 1 or len(idx) == 0 or idx.min() < 0 or idx.max() >= meta["count"]:
            raise ValueError(f"indices must be a non-empty 1-D sequence in [0, {meta['count']}) for {path}")
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True shards by torch.distributed rank: init the process group first")


def ssl_loader(path: Path, *, batch_size: int, views: Sequence[ViewRecipe] = MOCO_V3_VIEWS,
               resolution: int | None = None, num_workers: int = 2, seed: int = 0, distributed: bool = False,
               indices: Sequence[int] | None = None, device: str | torch.device = "cpu",
               drop_last: bool = True) -> Loader:
    """Multi-view loader over the FFCV file ``path``: each batch is ``(view_1, ..., view_n, label)``.

    Views are float32 [B, 3, R, R] tensors in channels_last memory format on ``device``, normalised with
    the mean/std of the metadata JSON next to ``path``; each is an independent RandomResizedCrop + flip of
    the same images. ``label`` is int64 [B]. ``resolution`` R defaults to the file's. The order is random,
    reshuffled every epoch and determined by ``seed`` and the epoch number; the augmentations are not (FFCV
    draws them from numba's per-thread generators, seeded from OS entropy). ``indices`` restricts the
    loader to a subset; ``distributed=True`` gives each torch.distributed rank a disjoint shard (padded by
    repetition to equal length, as torch's DistributedSampler does).

    FFCV reuses batch buffers: clone anything kept beyond the next batch. numba compiles the pipelines on
    the first batch (tens of seconds for several views): build the loader once per process and reuse it
    every epoch.
    """
    path = Path(path)
    meta = read_metadata(path)
    resolution = meta["resolution"] if resolution is None else resolution
    if not views:
        raise ValueError("ssl_loader needs at least one view")
    _check_args(path, meta, batch_size, resolution, indices, distributed)
    device = torch.device(device)  # FFCV's graph reads device.type, so a plain string breaks it

    def view_ops(recipe: ViewRecipe) -> list[Operation]:
        # Fresh operation objects per view: FFCV keys graph nodes by operation instance.
        return [
            RandomResizedCropRGBImageDecoder((resolution, resolution), scale=(recipe.crop_min, 1.0)),
            RandomHorizontalFlip(recipe.flip_p),
            _normalize(meta),
            *_to_torch(device),
        ]

    # FFCV 1.0.2 outputs the file's own fields first (image, label), then extra pipelines in insertion
    # order. Disabling "label" and re-adding it last as "target" puts the label after all the views.
    pipelines: dict[str, list[Operation] | PipelineSpec | None] = {"image": view_ops(views[0]), "label": None}
    for i, recipe in enumerate(views[1:], start=2):
        decoder, *transforms = view_ops(recipe)
        pipelines[f"image_{i}"] = PipelineSpec("image", decoder=decoder, transforms=transforms)
    pipelines["target"] = PipelineSpec("label", decoder=IntDecoder(), transforms=_label_ops(device))
    return Loader(str(path), batch_size=batch_size, num_workers=num_workers, order=OrderOption.RANDOM,
                  seed=seed, distributed=distributed, indices=indices, pipelines=pipelines,
                  drop_last=drop_last)


def eval_loader(path: Path, *, batch_size: int, resolution: int | None = None, crop_ratio: float = 224 / 256,
                num_workers: int = 2, distributed: bool = False, indices: Sequence[int] | None = None,
                device: str | torch.device = "cpu") -> Loader:
    """Evaluation loader over ``path`` in file (or ``indices``) order: batches ``(images, labels)``.

    Each image is centre-cropped to ``crop_ratio`` of its side, resized to ``resolution`` (default: the
    file's), normalised like ssl_loader's views (float32 [B, 3, R, R], channels_last, on ``device``);
    labels are int64 [B]. The last batch may be short. With ``distributed=True`` rank r reads samples
    r, r + world, ...; torch's DistributedSampler pads the shards to equal length by repeating the first
    samples, so a few samples appear twice when the count does not divide by the world size.

    FFCV reuses batch buffers: clone anything kept beyond the next batch. numba compiles the pipeline on
    the first batch: build the loader once per process and reuse it.
    """
    path = Path(path)
    meta = read_metadata(path)
    resolution = meta["resolution"] if resolution is None else resolution
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    _check_args(path, meta, batch_size, resolution, indices, distributed)
    device = torch.device(device)
    pipelines = {
        "image": [CenterCropRGBImageDecoder((resolution, resolution), ratio=crop_ratio), _normalize(meta),
                  *_to_torch(device)],
        "label": [IntDecoder(), *_label_ops(device)],
    }
    # seed=0: with no seed FFCV draws one from numpy's global generator, a side effect on the caller.
    return Loader(str(path), batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
                  seed=0, distributed=distributed, indices=indices, pipelines=pipelines, drop_last=False)
