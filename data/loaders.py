"""FFCV loaders: multi-view batches for self-supervised training and centre-cropped batches for evaluation.

Two things every caller must know about FFCV loaders:

- Batches live in buffers that FFCV reuses a few batches later: clone anything kept beyond the next batch
  (kNN banks, labels collected over an epoch).
- numba compiles the pipelines when a loader is first iterated, paid again by every new loader: build each
  loader once per process and iterate the same loader every epoch. The augmentation loops and kernels are
  cached on disk (data/augment.py), so only the decoders and FFCV's glue compile per loader.
- FFCV sets torch's intra-op thread count to ``num_workers`` whenever a loader is built or iterated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
from ffcv.loader import OrderOption
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

from data import augment as A
from data.convert import read_metadata
from data.device_augment import apply_view
from data.loader_thread import GuardedLoader
from data.normalize import DeviceNormalize
from data.ops import params_width, recipe_ops
from data.ops.crop import SeededRandomResizedCrops
from data.recipes import MOCO_V3_VIEWS, ViewRecipe, views_for

__all__ = ["MOCO_V3_VIEWS", "ViewRecipe", "eval_loader", "ssl_loader", "view_ops", "views_for"]


def _to_device(device: torch.device) -> list[Operation]:
    """ToDevice, or nothing on the CPU.

    On the CPU it would only add a torch copy per batch, and torch's spinning OpenMP threads then fight
    numba's for the cores: on 2 cores two-view throughput was then often about 10k images/s, not 50k.
    """
    return [] if device.type == "cpu" else [ToDevice(device, non_blocking=True)]


def _label_ops(device: torch.device) -> list[Operation]:
    """What follows IntDecoder: its [B, 1] int64 array -> [B] tensor on ``device``."""
    # Squeeze dim 1 only, so a batch of one stays [1].
    return [ToTensor(), *_to_device(device), Squeeze(1)]


class _Batches:
    """An FFCV epoch iterator whose outputs pass through ``finish`` (which makes the loader's batch)."""

    def __init__(self, epoch, finish) -> None:
        self.epoch, self.finish = epoch, finish

    def __iter__(self):
        return self

    def __next__(self):
        return self.finish(*next(self.epoch))

    def __len__(self) -> int:
        return len(self.epoch)

    def close(self) -> None:
        self.epoch.close()


class _Finished:
    """An FFCV Loader mixin: its batches pass through ``finish`` when one is set."""

    finish = None

    def __iter__(self):
        epoch = super().__iter__()
        return epoch if self.finish is None else _Batches(epoch, self.finish)


class ViewLoader(_Finished, A.SeededLoader):
    """SeededLoader over [B, V, H, W, 3] multi-view images whose batches are ``(view_1, ..., view_V, label)``.

    ``finish`` turns FFCV's outputs (all views, [the colour choices,] labels) into that tuple: split the
    host-normalised view-major batch, or finish each uint8 view on the device (apply_view, DeviceNormalize).
    """


class EvalLoader(_Finished, GuardedLoader):
    """A guarded FFCV Loader (data/loader_thread.py) whose uint8 images, with ``device_ops``, are normalised on
    the device (DeviceNormalize)."""


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


def view_ops(recipe: ViewRecipe, view: int, colour: bool = True) -> list[Operation]:
    """The seeded uint8 operations of view ``view`` (0-based) after its crop, in ViewRecipe's order; ops the
    recipe turns off are left out, and with ``colour=False`` those the device runs (the ops with params
    columns: ViewParams).

    Fresh operation objects every call: FFCV keys graph nodes by operation instance. ``view`` salts every
    random draw, so two views of one image differ and each is a pure function of (seed, epoch, sample index,
    view): see data/augment.py.
    """
    return [A.SeededOperation(op, view, args) for op, args in recipe_ops(recipe) if colour or not op.columns]


def _on_device(device: torch.device, device_ops: bool | None) -> bool:
    """Whether images travel as uint8 and the colour ops and normalisation run on ``device``: by default on
    CUDA only (on the CPU the loader's numba threads do them, and torch's threads stay with the model)."""
    return device.type == "cuda" if device_ops is None else device_ops


def ssl_loader(path: Path, *, batch_size: int, views: Sequence[ViewRecipe] = MOCO_V3_VIEWS,
               resolution: int | None = None, num_workers: int = 2, seed: int = 0, distributed: bool = False,
               indices: Sequence[int] | None = None, device: str | torch.device = "cpu",
               drop_last: bool = True, device_ops: bool | None = None) -> ViewLoader:
    """Multi-view loader over the FFCV file ``path``: each batch is ``(view_1, ..., view_n, label)``.

    Views are float32 [B, 3, R, R] tensors in channels_last memory format on ``device``, normalised with
    the mean/std of the metadata JSON next to ``path``; view i follows ``views[i]`` (default: MoCo v3's
    asymmetric pair; see data.recipes.views_for), every random choice made per image. ``label`` is int64
    [B]. ``resolution`` R defaults to the file's. The order is random, reshuffled every epoch; order and
    views are both determined by ``seed``, the epoch number (``loader.next_epoch``, settable on resume) and
    the sample index, so the same seed gives the same batches (data/augment.py). ``indices`` restricts the
    loader to a subset; ``distributed=True`` gives each torch.distributed rank a disjoint shard (padded by
    repetition to equal length, as torch's DistributedSampler does).

    Each image is decoded once and cut into all its views (SeededRandomResizedCrops). ``device_ops``
    (default: on CUDA): the loader's threads only crop and flip, the views travel to ``device`` as uint8
    with each image's colour choices (ViewParams), and colour jitter, grayscale, blur, solarize and
    normalisation run there (data/device_augment.py, data/normalize.py). Otherwise the loader's threads do
    everything. Both give the same bits.

    FFCV reuses batch buffers: clone anything kept beyond the next batch. numba compiles the pipelines on
    the first batch (seconds): build the loader once per process and reuse it every epoch.
    """
    path = Path(path)
    meta = read_metadata(path)
    resolution = meta["resolution"] if resolution is None else resolution
    if not views:
        raise ValueError("ssl_loader needs at least one view")
    _check_args(path, meta, batch_size, resolution, indices, distributed)
    device = torch.device(device)  # FFCV's graph reads device.type, so a plain string breaks it
    on_device = _on_device(device, device_ops)

    crops = SeededRandomResizedCrops((resolution, resolution), views)
    ops = [crops, *(op for v, recipe in enumerate(views) for op in view_ops(recipe, v, colour=not on_device))]
    ops += [ToTensor(), *_to_device(device)] if on_device else [A.Normalize(meta["mean"], meta["std"]), ToTensor()]
    # FFCV 1.0.2 outputs the file's own fields first (image, label), then extra pipelines in insertion
    # order. Disabling "label" and re-adding it last as "target" puts the label after the views.
    pipelines: dict[str, list[Operation] | PipelineSpec | None] = {"image": ops, "label": None}
    if on_device:  # the colour choices: after a decoder of the label field (ViewParams reads only the sample
        # indices), kept on the host, where device_augment reads the choices without a device sync
        pipelines["view_params"] = PipelineSpec("label", decoder=IntDecoder(),
                                                transforms=[A.ViewParams(views, resolution), ToTensor()])
    pipelines["target"] = PipelineSpec("label", decoder=IntDecoder(), transforms=_label_ops(device))
    loader = ViewLoader(str(path), batch_size=batch_size, num_workers=num_workers, order=OrderOption.RANDOM,
                        seed=seed, distributed=distributed, indices=indices, pipelines=pipelines,
                        drop_last=drop_last)
    if on_device:
        normalize = DeviceNormalize(meta["mean"], meta["std"], device)
        widths = [params_width(recipe) for recipe in views]

        def finish(images, params, label):
            return (*(normalize(apply_view(images[:, v], params[:, v, :widths[v]], recipe))
                      for v, recipe in enumerate(views)), label)

        loader.finish = finish
    else:  # view-major float32 [V, B, R, R, 3]: each view is already a contiguous channels-last batch
        loader.finish = lambda images, label: (*images.permute(0, 1, 4, 2, 3).unbind(0), label)
    return loader


def eval_loader(path: Path, *, batch_size: int, resolution: int | None = None, crop_ratio: float = 224 / 256,
                num_workers: int = 2, distributed: bool = False, indices: Sequence[int] | None = None,
                device: str | torch.device = "cpu", device_ops: bool | None = None) -> EvalLoader:
    """Evaluation loader over ``path`` in file (or ``indices``) order: batches ``(images, labels)``.

    Each image is centre-cropped to ``crop_ratio`` of its side, resized to ``resolution`` (default: the
    file's), normalised like ssl_loader's views (float32 [B, 3, R, R], channels_last, on ``device``);
    labels are int64 [B]; ``device_ops``: normalised on the device, as in ssl_loader. The last batch may be short. With
    ``distributed=True`` rank r reads samples r, r + world, ...; torch's DistributedSampler pads the shards to
    equal length by repeating the first samples, so a few samples appear twice when the count does not divide
    by the world size.

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
    crop = CenterCropRGBImageDecoder((resolution, resolution), ratio=crop_ratio)
    on_device = _on_device(device, device_ops)
    image_ops = ([crop, ToTensor(), *_to_device(device)] if on_device else
                 [crop, A.Normalize(meta["mean"], meta["std"]), ToTensor(), ToTorchImage(channels_last=True)])
    pipelines = {"image": image_ops, "label": [IntDecoder(), *_label_ops(device)]}
    # seed=0: with no seed FFCV draws one from numpy's global generator, a side effect on the caller.
    loader = EvalLoader(str(path), batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
                        seed=0, distributed=distributed, indices=indices, pipelines=pipelines, drop_last=False)
    if on_device:
        normalize = DeviceNormalize(meta["mean"], meta["std"], device)
        loader.finish = lambda images, label: (normalize(images), label)
    return loader
