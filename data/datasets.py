"""Datasets by name or path: validate (``check``), convert to FFCV when needed (``prepare`` / ``convert``), and the
``ssl-study convert`` command's arguments.

Sources: the built-in sets of data/builtin.py ("fashion_mnist", "mnist": 32 px, raw), an ImageNet-style image
folder (data/image_folder.py: by default capped at 256 px and stored smart, i.e. JPEG q90 above 96x96 px), and
numpy arrays (``convert_arrays``). Every .beton gets a metadata JSON next to it (data/convert.py); converting an
up-to-date source again does nothing, a changed source (or other options) is converted again; files are
written under a temporary name and renamed when complete (data/atomic.py).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import hashlib
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from data import image_folder
from data.builtin import BUILTIN, SPLITS
from data.convert import (
    SMART_THRESHOLD,
    WRITE_MODES,
    convert_builtin,
    read_metadata,
    up_to_date,
    write_beton,
    write_metadata,
    writing_beton,
)
from data.image_folder import DatasetError

__all__ = ["BUILTIN", "DatasetError", "add_convert_arguments", "check", "convert", "convert_arrays",
           "convert_from_args", "convert_mnist", "prepare"]

_ACCEPTED = f"{', '.join(BUILTIN)}, or the path of an existing ImageNet-style image folder"
# Image folders are stored capped and compressed by default, as in FFCV's ImageNet example (max_resolution
# 256-512, JPEG q90): raw at full size, a 1600 px photo takes 7.7 MB and ImageNet's 1.28M images hundreds of GB.
FOLDER_MAX_RESOLUTION = 256
FOLDER_WRITE_MODE = "smart"
BUILTIN_WRITE_MODE = "raw"  # 32 px images stay bit-exact (and existing conversions stay up to date)


def _is_builtin(dataset: str) -> bool:
    return str(dataset) in BUILTIN


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _human(n: float) -> str:
    """Bytes in decimal units, 3 significant digits: 48 GB, 16.8 MB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[None]:
    """FFCV's writer always shows a tqdm progress bar (ffcv.writer.tqdm: done/total, elapsed<remaining, rate);
    swap in a disabled one when asked."""
    if enabled:
        yield
        return
    from ffcv import writer as ffcv_writer  # FFCV only once a file is written: it costs 4 s to import

    original = ffcv_writer.tqdm
    ffcv_writer.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        ffcv_writer.tqdm = original


def _check_writable(out_dir: Path) -> None:
    """DatasetError unless ``out_dir`` exists (or can be made) and a file can be created in it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"output folder {out_dir} is an existing file, not a folder: give a folder for the "
                           ".beton files (created if missing)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DatasetError(f"output folder {out_dir} is not writable ({e.strerror or e})") from e


def _check_options(write_mode: str | None, jpeg_quality: int, max_resolution: int | None, workers: int,
                   smart_threshold: int = SMART_THRESHOLD, val_fraction: float = 0.1) -> None:
    if write_mode is not None and write_mode not in WRITE_MODES:
        raise DatasetError(f"unknown write_mode {write_mode!r}: accepted values are {', '.join(WRITE_MODES)}")
    if not 1 <= jpeg_quality <= 100:
        raise DatasetError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    if max_resolution is not None and max_resolution < 0:
        raise DatasetError(f"max_resolution must be a positive number of pixels, or 0 (or None) for no cap; "
                           f"got {max_resolution}")
    if workers < 1:
        raise DatasetError(f"workers must be >= 1, got {workers}")
    if smart_threshold < 0:
        raise DatasetError(f"smart_threshold must be >= 0 bytes (0: every image JPEG), got {smart_threshold}")
    if not 0 <= val_fraction <= 1:  # also rejects NaN; a folder it splits needs (0, 1), which scan() checks
        raise DatasetError(f"val_fraction must be a share in [0, 1] (in (0, 1) for a folder without train/ and "
                           f"val/, which it splits); got {val_fraction}")


def _not_found(dataset: str) -> DatasetError:
    close = difflib.get_close_matches(dataset.lower().replace("-", "_"), BUILTIN, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return DatasetError(f"dataset {dataset!r} is neither a built-in name nor an existing folder{hint}: "
                        f"accepted values are {_ACCEPTED}")


# ---------------------------------------------------------------------------------------------- check


def check(dataset: str, data_dir: Path) -> None:
    """Cheap validation, no conversion: DatasetError naming the dataset and what is accepted.

    Built-in names need their source files; a path must be an existing image folder with class sub-folders
    (or train/ and val/ folders); ``data_dir`` must be writable (created if missing).
    """
    dataset = str(dataset)
    if _is_builtin(dataset):
        try:
            for split in SPLITS:
                BUILTIN[dataset].find_sources(split, None)
        except FileNotFoundError as e:
            raise DatasetError(f"dataset {dataset!r}: {e}") from e
    else:
        root = Path(dataset)
        if not dataset or not root.exists():
            raise _not_found(dataset)
        if not root.is_dir():
            image_folder.scan(root)  # its message: a file, not a folder (an archive to extract?)
        folder = root / "train" if (root / "train").is_dir() else root
        if not any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir()):
            raise DatasetError(f"dataset folder {folder} has no class sub-folders: accepted values are {_ACCEPTED} "
                               "(<folder>/<class>/<images> or <folder>/{train,val}/<class>/<images>)")
    _check_writable(data_dir)


# ---------------------------------------------------------------------------------------------- conversion


def convert_mnist(out_dir: Path, *, root: Path | None = None, write_mode: str = BUILTIN_WRITE_MODE) -> dict[str, Path]:
    """Write ``mnist_{train,test}.beton`` (32x32 RGB, zero-padded like Fashion-MNIST) into ``out_dir``; skipped
    when up to date with the source files (data/mnist.py says where it looks)."""
    try:
        return convert_builtin("mnist", out_dir, root=root, write_mode=write_mode)
    except FileNotFoundError as e:
        raise DatasetError(str(e)) from e


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


def _storage(max_resolution: int | None, write_mode: str, jpeg_quality: int, estimate: image_folder.SizeEstimate
             ) -> str:
    """'at <= 256 px, smart (JPEG q90 for 100% of the images, ~9% of raw size)', for the line before writing."""
    size = f"at <= {max_resolution} px" if max_resolution else "at full resolution"
    if estimate.jpeg_fraction is None:
        return f"{size}, {write_mode}"
    share = f"for {estimate.jpeg_share:.0%} of the images, " if write_mode == "smart" else ""
    return f"{size}, {write_mode} (JPEG q{jpeg_quality} {share}~{estimate.jpeg_fraction:.0%} of raw size)"


def _corrupt(bad: Path, why: str, count: str, where: str) -> DatasetError:
    return DatasetError(f"corrupt or unreadable image {bad} ({why}); {count} such file(s) in {where}: fix or remove "
                        "them, or convert with skip_corrupt (--skip-corrupt) to leave them out")


def _convert_folder(root: Path, scan: image_folder.FolderScan, out_dir: Path, *, max_resolution: int | None,
                    write_mode: str, jpeg_quality: int, workers: int, val_fraction: float, skip_corrupt: bool,
                    progress: bool, smart_threshold: int, log: Callable[[str], object]) -> dict[str, Path]:
    options = {"max_resolution": max_resolution, "write_mode": write_mode, "jpeg_quality": jpeg_quality,
               "val_fraction": val_fraction if scan.layout == "flat" else None, "skip_corrupt": skip_corrupt,
               "smart_threshold": smart_threshold}
    checksum = scan.checksum(options)
    name = root.resolve().name
    kwargs = dict(max_resolution=max_resolution, write_mode=write_mode, jpeg_quality=jpeg_quality,
                  smart_threshold=smart_threshold, workers=workers)
    paths, todo = {}, {}
    for split, items in scan.splits.items():
        beton = Path(out_dir) / f"{name}_{split}.beton"
        paths["train" if split == "train" else "test"] = beton
        if up_to_date(beton, checksum, write_mode):
            continue
        where = f"{root}/{split}" if scan.layout != "flat" else str(root)
        estimate = image_folder.estimate_size(items, **kwargs)
        if estimate.unreadable and not skip_corrupt:  # fail before writing anything, as the writer would
            checked = min(len(items), image_folder.HEADER_SAMPLE)
            raise _corrupt(*estimate.unreadable[0], f"{len(estimate.unreadable)} of {checked} checked", where)
        if len(estimate.unreadable) == len(items):
            raise DatasetError(f"{where}: no readable image in split {split!r} ({len(items)} corrupt)")
        todo[split] = (beton, items, where, estimate)
    needed = sum(estimate.file_bytes for *_, estimate in todo.values())
    free = shutil.disk_usage(out_dir).free if todo else math.inf
    if needed > free:
        images = sum(estimate.images for *_, estimate in todo.values())
        storage = _storage(max_resolution, write_mode, jpeg_quality, next(iter(todo.values()))[3])
        raise DatasetError(f"output folder {out_dir} has {_human(free)} free, but converting {images:,} images of "
                           f"{root} needs ~{_human(needed)} ({storage}): free space there, choose another output "
                           "folder, or store smaller images (--max-resolution, --write-mode jpg)")
    for split, (beton, items, where, estimate) in todo.items():
        log(f"converting {len(items):,} images of {root} ({split}) to ~{_human(estimate.file_bytes)} "
            f"{_storage(max_resolution, write_mode, jpeg_quality, estimate)} -> {beton} "
            f"({_human(shutil.disk_usage(out_dir).free)} free)")
        with _progress(progress), writing_beton(beton) as tmp:
            failed, stats = image_folder.write_split(items, tmp, **kwargs)
            if len(failed) and not skip_corrupt:
                bad = items[failed[0]][0]
                raise _corrupt(bad, image_folder.first_failure([items[failed[0]]], max_resolution),
                               str(len(failed)), where)
            failed_set = set(failed.tolist())
            good = [it for i, it in enumerate(items) if i not in failed_set]
            if not good:
                raise DatasetError(f"{where}: no readable image in split {split!r} ({len(failed)} corrupt)")
            if len(failed):  # write again without the placeholders of the corrupt files
                _, stats = image_folder.write_split(good, tmp, **kwargs)
        write_metadata(beton, {
            "count": len(good), "num_classes": len(scan.classes), "classes": scan.classes,
            "resolution": max(stats["max_height"], stats["max_width"]), **stats,
            "source": f"image folder {root.resolve()} ({scan.layout}, split {split})", "split": split,
            "checksum": checksum, "write_mode": write_mode, "options": options,
            "skipped_corrupt": [str(items[i][0]) for i in failed], "ignored_files": scan.ignored[split],
        })
    return paths


def convert(source: str | Path, out_dir: Path, *, max_resolution: int | None = FOLDER_MAX_RESOLUTION,
            write_mode: str | None = None, jpeg_quality: int = 90, workers: int = 2, val_fraction: float = 0.1,
            skip_corrupt: bool = False, progress: bool = True, smart_threshold: int = SMART_THRESHOLD,
            log: Callable[[str], object] = _stderr) -> dict[str, Path]:
    """Convert ``source`` ("fashion_mnist", "mnist" or an image folder) into ``out_dir``: {"train": .., "test": ..}.

    Image folders: ``max_resolution`` caps the longest side (default 256; 0 or None: full size; cv2 INTER_AREA,
    as FFCV), ``write_mode`` defaults to smart; ``val_fraction`` splits a flat class folder; ``skip_corrupt``
    leaves corrupt images out (their paths go to the metadata's "skipped_corrupt") instead of raising
    DatasetError. Before writing, the output size is estimated (data/image_folder.py ``estimate_size``) and
    ``log`` gets one line about it (default: stderr); DatasetError if the output folder has less free space.
    Built-in sets are 32 px, raw by default. ``write_mode`` raw (exact pixels), jpg (``jpeg_quality``) or smart
    (JPEG above ``smart_threshold`` raw bytes); ``workers`` writer processes; ``progress`` shows a bar with
    elapsed and remaining time. Up-to-date outputs are left alone. Bad input raises DatasetError naming the
    value and what is accepted, before anything is written.
    """
    _check_options(write_mode, jpeg_quality, max_resolution, workers, smart_threshold, val_fraction)
    out_dir = Path(out_dir)
    source = str(source)
    if _is_builtin(source):
        check(source, out_dir)
        with _progress(progress):
            return convert_builtin(source, out_dir, write_mode=write_mode or BUILTIN_WRITE_MODE)
    root = Path(source)
    if not source or not root.exists():
        raise DatasetError(f"source {source!r} not found: accepted values are {_ACCEPTED}")
    scan = image_folder.scan(root, val_fraction)  # layout errors before touching the output folder
    scanned = [root] if scan.layout == "flat" else [root / "train", *(root / n for n in image_folder.EVAL_SPLIT_NAMES)]
    if any(out_dir.resolve().is_relative_to(folder.resolve()) for folder in scanned):
        raise DatasetError(f"output folder {out_dir} is inside the image folder it converts ({root}): its files "
                           "would be read as images or classes next time; choose a folder outside it")
    _check_writable(out_dir)
    return _convert_folder(root, scan, out_dir, max_resolution=max_resolution or None,
                           write_mode=write_mode or FOLDER_WRITE_MODE, jpeg_quality=jpeg_quality, workers=workers,
                           val_fraction=val_fraction, skip_corrupt=skip_corrupt, progress=progress,
                           smart_threshold=smart_threshold, log=log)


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
    parser.add_argument("--max-resolution", type=int, default=FOLDER_MAX_RESOLUTION,
                        help=f"image folders: cap on the longest image side in px (default {FOLDER_MAX_RESOLUTION}; "
                             "0: no cap, full resolution). fashion_mnist and mnist are always 32 px")
    parser.add_argument("--write-mode", choices=WRITE_MODES, default=None,
                        help="raw: exact pixels; jpg: JPEG; smart: JPEG for images above --smart-threshold bytes, "
                             f"raw below (default: {FOLDER_WRITE_MODE} for image folders, {BUILTIN_WRITE_MODE} for "
                             "fashion_mnist and mnist)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality, 1-100 (default 90)")
    parser.add_argument("--smart-threshold", type=int, default=SMART_THRESHOLD,
                        help=f"smart mode: raw bytes (h*w*3) above which an image is stored as JPEG "
                             f"(default {SMART_THRESHOLD}: 96x96 px)")
    parser.add_argument("--workers", type=int, default=2, help="writer processes (default 2)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of each class held out as val/ when the folder has no train/ and val/, in (0, 1) "
                             "(default 0.1)")
    parser.add_argument("--skip-corrupt", action="store_true", help="leave corrupt images out instead of stopping")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (by default one per file: done/total, elapsed<remaining, rate)")


def summary(split: str, beton: Path) -> str:
    """One line about a converted split, from its metadata."""
    meta = read_metadata(beton)
    skipped = meta.get("skipped_corrupt", [])
    jpeg = f" ({meta['jpeg_images']} as JPEG)" if "jpeg_images" in meta else ""
    return (f"{split}: {meta['count']} images, {meta['num_classes']} classes, resolution {meta['resolution']} px, "
            f"{meta['write_mode']}{jpeg} -> {beton} ({_human(beton.stat().st_size)}; skipped {len(skipped)} corrupt, "
            f"ignored {meta.get('ignored_files', 0)} non-image files)")


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
