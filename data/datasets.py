"""Datasets by name or path: validate (``check``), convert to FFCV when needed (``prepare`` / ``convert``), and the
``ssl-study convert`` command's arguments.

Sources: "fashion_mnist" (Debian's dataset-fashion-mnist), "mnist" (data/mnist.py says where it looks), an
ImageNet-style image folder (data/image_folder.py), and numpy arrays (``convert_arrays``). Every .beton
gets a metadata JSON next to it (data/convert.py); converting an up-to-date source again does nothing, a
changed source (or other options) is converted again; files are written under a temporary name and
renamed when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from ffcv import writer as ffcv_writer

from data import image_folder, mnist
from data.convert import (
    SMART_THRESHOLD,
    WRITE_MODES,
    convert_fashion_mnist,
    file_checksum,
    read_metadata,
    replace_beton,
    temp_name,
    to_rgb32,
    up_to_date,
    write_beton,
)
from data.fashion_mnist import FASHION_MNIST_DIR, SPLITS, split_files
from data.image_folder import DatasetError

__all__ = ["BUILTIN", "DatasetError", "add_convert_arguments", "check", "convert", "convert_arrays",
           "convert_from_args", "convert_mnist", "prepare"]

BUILTIN = ("fashion_mnist", "mnist")
_ACCEPTED = f"{', '.join(BUILTIN)}, or the path of an existing ImageNet-style image folder"


def _is_builtin(dataset: str) -> bool:
    return str(dataset) in BUILTIN


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[None]:
    """FFCV's writer always shows a tqdm progress bar (ffcv.writer.tqdm); swap in a disabled one when asked."""
    if enabled:
        yield
        return
    original = ffcv_writer.tqdm
    ffcv_writer.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        ffcv_writer.tqdm = original


def _check_writable(out_dir: Path) -> None:
    """DatasetError unless ``out_dir`` exists (or can be made) and a file can be created in it."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DatasetError(f"output folder {out_dir} is not writable ({e.strerror or e})") from e


def _check_options(write_mode: str, jpeg_quality: int, max_resolution: int | None, workers: int) -> None:
    if write_mode not in WRITE_MODES:
        raise DatasetError(f"unknown write_mode {write_mode!r}: accepted values are {', '.join(WRITE_MODES)}")
    if not 1 <= jpeg_quality <= 100:
        raise DatasetError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    if max_resolution is not None and max_resolution < 1:
        raise DatasetError(f"max_resolution must be a positive number of pixels, got {max_resolution}")
    if workers < 1:
        raise DatasetError(f"workers must be >= 1, got {workers}")


# ---------------------------------------------------------------------------------------------- check


def check(dataset: str, data_dir: Path) -> None:
    """Cheap validation, no conversion: DatasetError naming the dataset and what is accepted.

    Built-in names need their source files; a path must be an existing image folder with class sub-folders
    (or train/ and val/ folders); ``data_dir`` must be writable (created if missing).
    """
    dataset = str(dataset)
    if dataset == "fashion_mnist":
        try:
            for split in SPLITS:
                split_files(split)
        except FileNotFoundError as e:
            raise DatasetError(f"dataset 'fashion_mnist': {e}") from e
    elif dataset == "mnist":
        try:
            for split in SPLITS:
                mnist.find_sources(split)
        except FileNotFoundError as e:
            raise DatasetError(f"dataset 'mnist': {e}") from e
    else:
        root = Path(dataset)
        if not root.is_dir():
            raise DatasetError(f"dataset {dataset!r} is neither a built-in name nor an existing folder: "
                               f"accepted values are {_ACCEPTED}")
        folder = root / "train" if (root / "train").is_dir() else root
        if not any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir()):
            raise DatasetError(f"dataset folder {folder} has no class sub-folders: accepted values are {_ACCEPTED} "
                               "(<folder>/<class>/<images> or <folder>/{train,val}/<class>/<images>)")
    _check_writable(data_dir)


# ---------------------------------------------------------------------------------------------- conversion


def convert_mnist(out_dir: Path, *, root: Path | None = None, write_mode: str = "raw") -> dict[str, Path]:
    """Write ``mnist_{train,test}.beton`` (32x32 RGB, zero-padded like Fashion-MNIST) into ``out_dir``; skipped
    when up to date with the source files (data/mnist.py)."""
    out_dir = Path(out_dir)
    paths = {}
    for split in SPLITS:
        try:
            sources = mnist.find_sources(split, root)
        except FileNotFoundError as e:
            raise DatasetError(str(e)) from e
        checksum = file_checksum(*sources)
        beton = out_dir / f"mnist_{split}.beton"
        if not up_to_date(beton, checksum, write_mode):
            images, labels = mnist.load_mnist(split, root)
            write_beton(to_rgb32(images), labels, beton, source=f"mnist {split} ({sources[0].name})",
                        classes=mnist.CLASSES, write_mode=write_mode, checksum=checksum)
        paths[split] = beton
    return paths


def convert_arrays(images: np.ndarray, labels: np.ndarray, out_path: Path, class_names: Sequence[str] | None = None,
                   *, write_mode: str = "raw", jpeg_quality: int = 90, workers: int = 2, source: str = "numpy arrays",
                   progress: bool = True) -> Path:
    """Write uint8 images ([N, H, H, 3] RGB or [N, H, H] grey, repeated to RGB) and integer labels to
    ``out_path`` (+ metadata JSON). ``class_names`` defaults to "0".."max label". Skipped when the file holds
    exactly these arrays already (a sha256 of their bytes is the metadata checksum)."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 3 and images.dtype == np.uint8:
        images = np.repeat(images[..., None], 3, axis=-1)
    if class_names is None:
        class_names = [str(i) for i in range(int(labels.max()) + 1 if labels.size else 0)]
    _check_options(write_mode, jpeg_quality, None, workers)
    out_path = Path(out_path)
    _check_writable(out_path.parent)
    digest = hashlib.sha256()
    for part in (images, labels.astype(np.int64), np.asarray(list(class_names), dtype=str)):
        digest.update(repr((part.dtype.str, part.shape)).encode())
        digest.update(np.ascontiguousarray(part).tobytes())
    checksum = digest.hexdigest()
    if up_to_date(out_path, checksum, write_mode):
        return out_path
    with _progress(progress):
        return write_beton(images, labels, out_path, source=source, classes=list(class_names),
                           write_mode=write_mode, jpeg_quality=jpeg_quality, num_workers=workers, checksum=checksum)


def _convert_folder(root: Path, out_dir: Path, *, max_resolution: int | None, write_mode: str, jpeg_quality: int,
                    workers: int, val_fraction: float, skip_corrupt: bool, progress: bool,
                    smart_threshold: int) -> dict[str, Path]:
    scan = image_folder.scan(root, val_fraction)
    options = {"max_resolution": max_resolution, "write_mode": write_mode, "jpeg_quality": jpeg_quality,
               "val_fraction": val_fraction if scan.layout == "flat" else None, "skip_corrupt": skip_corrupt,
               "smart_threshold": smart_threshold}
    checksum = scan.checksum(options)
    name = root.resolve().name
    paths = {}
    for split, items in scan.splits.items():
        beton = Path(out_dir) / f"{name}_{split}.beton"
        key = "train" if split == "train" else "test"
        paths[key] = beton
        if up_to_date(beton, checksum, write_mode):
            continue
        tmp = temp_name(beton)
        kwargs = dict(max_resolution=max_resolution, write_mode=write_mode, jpeg_quality=jpeg_quality,
                      smart_threshold=smart_threshold, workers=workers)
        try:
            with _progress(progress):
                failed, stats = image_folder.write_split(items, tmp, **kwargs)
                if len(failed) and not skip_corrupt:
                    bad = items[failed[0]][0]
                    why = image_folder.first_failure([items[failed[0]]], max_resolution)
                    raise DatasetError(f"corrupt or unreadable image {bad} ({why}); {len(failed)} such file(s) in "
                                       f"{root}/{split if scan.layout != 'flat' else ''}: fix or remove them, or "
                                       "convert with skip_corrupt (--skip-corrupt) to leave them out")
                good = [it for i, it in enumerate(items) if i not in set(failed.tolist())]
                if not good:
                    raise DatasetError(f"{root}: no readable image in split {split!r} ({len(failed)} corrupt)")
                if len(failed):  # write again without the placeholders of the corrupt files
                    _, stats = image_folder.write_split(good, tmp, **kwargs)
            metadata = {
                "count": len(good), "num_classes": len(scan.classes), "classes": scan.classes,
                "resolution": max(stats["max_height"], stats["max_width"]), **stats,
                "source": f"image folder {root.resolve()} ({scan.layout}, split {split})", "split": split,
                "checksum": checksum, "write_mode": write_mode, "options": options,
                "skipped_corrupt": [str(items[i][0]) for i in failed], "ignored_files": scan.ignored[split],
            }
            replace_beton(tmp, beton, metadata)
        finally:
            tmp.unlink(missing_ok=True)
    return paths


def convert(source: str | Path, out_dir: Path, *, max_resolution: int | None = None, write_mode: str = "raw",
            jpeg_quality: int = 90, workers: int = 2, val_fraction: float = 0.1, skip_corrupt: bool = False,
            progress: bool = True, smart_threshold: int = SMART_THRESHOLD) -> dict[str, Path]:
    """Convert ``source`` ("fashion_mnist", "mnist" or an image folder) into ``out_dir``: {"train": .., "test": ..}.

    ``max_resolution`` caps the longest side (image folders; cv2 INTER_AREA, as FFCV); ``write_mode`` raw (exact
    pixels), jpg (``jpeg_quality``) or smart (JPEG above ``smart_threshold`` raw bytes); ``workers`` writer
    processes; ``val_fraction`` splits a flat class folder; ``skip_corrupt`` leaves corrupt images out (their
    paths go to the metadata's "skipped_corrupt") instead of raising DatasetError; ``progress`` shows a bar.
    Up-to-date outputs are left alone. Bad input raises DatasetError naming the path.
    """
    _check_options(write_mode, jpeg_quality, max_resolution, workers)
    out_dir = Path(out_dir)
    if _is_builtin(str(source)):
        check(str(source), out_dir)
        with _progress(progress):
            if str(source) == "fashion_mnist":
                return convert_fashion_mnist(out_dir, root=FASHION_MNIST_DIR, write_mode=write_mode)
            return convert_mnist(out_dir, write_mode=write_mode)
    root = Path(source)
    if not root.exists():
        raise DatasetError(f"source {str(source)!r} not found: accepted values are {_ACCEPTED}")
    scan_first = image_folder.scan(root, val_fraction)  # layout errors before touching the output folder
    del scan_first
    _check_writable(out_dir)
    return _convert_folder(root, out_dir, max_resolution=max_resolution, write_mode=write_mode,
                           jpeg_quality=jpeg_quality, workers=workers, val_fraction=val_fraction,
                           skip_corrupt=skip_corrupt, progress=progress, smart_threshold=smart_threshold)


def prepare(dataset: str, data_dir: Path, **convert_options) -> dict[str, Path]:
    """{"train": .beton, "test": .beton} for ``dataset`` under ``data_dir``, converting only when needed.

    ``dataset`` is "fashion_mnist", "mnist" or the path of an image folder; ``convert_options`` go to ``convert``
    (progress defaults to off here).
    """
    check(dataset, data_dir)
    convert_options.setdefault("progress", False)
    return convert(dataset, Path(data_dir), **convert_options)


# ---------------------------------------------------------------------------------------------- command line


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ssl-study convert SOURCE OUT_DIR [options]``."""
    parser.add_argument("source", help=f"what to convert: {_ACCEPTED}")
    parser.add_argument("out_dir", type=Path, help="folder for the .beton files and their metadata JSON")
    parser.add_argument("--max-resolution", type=int, default=None, help="cap on the longest image side (px)")
    parser.add_argument("--write-mode", choices=WRITE_MODES, default="raw",
                        help="raw: exact pixels; jpg: JPEG; smart: JPEG for images above --smart-threshold bytes")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--smart-threshold", type=int, default=SMART_THRESHOLD)
    parser.add_argument("--workers", type=int, default=2, help="writer processes")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of each class held out as val/ when the folder has no train/ and val/")
    parser.add_argument("--skip-corrupt", action="store_true", help="leave corrupt images out instead of stopping")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def summary(split: str, beton: Path) -> str:
    """One line about a converted split, from its metadata."""
    meta = read_metadata(beton)
    skipped = meta.get("skipped_corrupt", [])
    return (f"{split}: {meta['count']} images, {meta['num_classes']} classes, resolution {meta['resolution']} px, "
            f"{meta['write_mode']} -> {beton} (skipped {len(skipped)} corrupt, ignored "
            f"{meta.get('ignored_files', 0)} non-image files)")


def convert_from_args(args: argparse.Namespace) -> int:
    """Run ``convert`` with parsed ``add_convert_arguments`` arguments; prints one line per split; returns 0.
    Bad input raises DatasetError."""
    paths = convert(args.source, args.out_dir, max_resolution=args.max_resolution, write_mode=args.write_mode,
                    jpeg_quality=args.jpeg_quality, workers=args.workers, val_fraction=args.val_fraction,
                    skip_corrupt=args.skip_corrupt, progress=not args.no_progress,
                    smart_threshold=args.smart_threshold)
    for split, beton in paths.items():
        print(summary(split, beton))
    return 0
