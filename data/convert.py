"""Write image datasets to FFCV .beton files, each with a metadata JSON next to it."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from data.atomic import atomic_path, write_text
from data.builtin import BUILTIN, SPLITS
from data.fashion_mnist import FASHION_MNIST_DIR

FORMAT_VERSION = 1
WRITE_MODES = ("raw", "jpg", "smart")
# "smart" stores an image as JPEG when its raw pixels take more than this many bytes (FFCV's smart_threshold),
# raw otherwise: small images (32 px) stay bit-exact, photographs are compressed.
SMART_THRESHOLD = 96 * 96 * 3
_MIN_PAGE_SIZE = 8 << 20  # FFCV's default page size


class _ArrayDataset:
    """Indexable (image, label) view of two arrays, the input DatasetWriter.from_indexed_dataset wants."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


def to_rgb32(images: np.ndarray) -> np.ndarray:
    """[N, 28, 28] uint8 grey images -> [N, 32, 32, 3] uint8: zero-pad 2 px per side, repeat to 3 channels."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"expected uint8 [N, 28, 28] images, got {images.dtype} {images.shape}")
    out = np.zeros((len(images), 32, 32, 3), dtype=np.uint8)
    out[:, 2:30, 2:30, :] = images[..., None]
    return out


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 [N, H, W, C] images, on the 0-255 scale.

    Computed exactly from per-channel value histograms: 8x faster than float sums over 60k images and
    needs no full-size float copy.
    """
    channels = images.shape[-1]
    hist = np.zeros((channels, 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        pixels = images[start:start + chunk].reshape(-1, channels)
        for c in range(channels):
            hist[c] += np.bincount(pixels[:, c], minlength=256)
    values = np.arange(256, dtype=np.float64)
    n = hist.sum(axis=1)
    mean = hist @ values / n
    std = np.sqrt(np.maximum(hist @ values**2 / n - mean**2, 0.0))
    return mean.tolist(), std.tolist()


def _check_inputs(images: np.ndarray, labels: np.ndarray, classes: Sequence[str], write_mode: str,
                  jpeg_quality: int) -> None:
    """Reject bad inputs before any file is touched.

    This matters beyond clear messages: FFCV's DatasetWriter waits forever for a worker process that
    raised, so a bad sample must never reach it.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[3] != 3 or images.shape[1] != images.shape[2] or len(images) == 0:
        raise ValueError(f"expected non-empty square uint8 [N, H, H, 3] images, got "
                         f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"expected {len(images)} integer labels, got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise ValueError(f"labels span [{labels.min()}, {labels.max()}], outside [0, {len(classes)})")
    if write_mode not in WRITE_MODES:
        raise ValueError(f"unknown write_mode {write_mode!r}: accepted values are {', '.join(WRITE_MODES)}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")


def _page_size(image_bytes: int) -> int:
    """A power-of-two FFCV page that holds any one sample (even a JPEG larger than raw), so no worker
    hits FFCV's MemoryError, which would hang the writer."""
    return max(_MIN_PAGE_SIZE, 1 << (2 * image_bytes).bit_length())


@contextlib.contextmanager
def writing_beton(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for FFCV's DatasetWriter (data/atomic.py); when the block
    completes, the old metadata JSON is removed and then the file renamed onto ``path``, so if we die between
    the two no JSON describes the new file. Write the new JSON after the block (``write_metadata``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        yield tmp
        path.with_suffix(".json").unlink(missing_ok=True)


def write_metadata(beton: Path, metadata: dict) -> Path:
    """Write ``metadata`` (+ format_version) atomically as the JSON next to ``beton``; returns its path."""
    return write_text(Path(beton).with_suffix(".json"),
                      json.dumps({**metadata, "format_version": FORMAT_VERSION}, indent=2) + "\n")


def write_beton(images: np.ndarray, labels: np.ndarray, path: Path, *, source: str, classes: Sequence[str],
                write_mode: str = "raw", jpeg_quality: int = 90, num_workers: int = 2,
                checksum: str | None = None, smart_threshold: int = SMART_THRESHOLD) -> Path:
    """Write uint8 [N, H, H, 3] images and integer labels to an FFCV file with fields ``image`` and ``label``.

    The .beton is written under a temporary name and renamed onto ``path`` only when complete, after the old
    metadata JSON is removed; the new JSON (``path.with_suffix(".json")``: count, classes, resolution,
    per-channel mean/std on the 0-255 scale, source, checksum, write_mode, format_version) is written after it,
    also atomically. A JSON next to a .beton therefore always describes that complete file.
    """
    from ffcv.fields import IntField, RGBImageField  # FFCV only once a file is written: it costs 4 s to import
    from ffcv.writer import DatasetWriter

    path = Path(path)
    _check_inputs(images, labels, classes, write_mode, jpeg_quality)
    resolution = images.shape[1]
    mean, std = channel_stats(images)
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=resolution, jpeg_quality=jpeg_quality,
                               smart_threshold=smart_threshold),
        "label": IntField(),
    }
    with writing_beton(path) as tmp:
        writer = DatasetWriter(str(tmp), fields, page_size=_page_size(images[0].nbytes),
                               num_workers=num_workers)
        writer.from_indexed_dataset(_ArrayDataset(images, np.asarray(labels)), chunksize=1000)
    write_metadata(path, {
        "count": len(images),
        "num_classes": len(classes),
        "classes": list(classes),
        "resolution": resolution,
        "mean": mean,
        "std": std,
        "source": source,
        "checksum": checksum,
        "write_mode": write_mode,
    })
    return path


def read_metadata(beton: Path) -> dict:
    """The metadata JSON written next to ``beton`` by write_beton."""
    meta_path = Path(beton).with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"no metadata {meta_path} for {beton} (data.convert.write_beton writes both)")
    return json.loads(meta_path.read_text())


def file_checksum(*paths: Path) -> str:
    """sha256 hex digest over the bytes of ``paths``, in order."""
    if not paths:
        raise ValueError("file_checksum needs at least one path")
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def up_to_date(beton: Path, checksum: str, write_mode: str) -> bool:
    """True when ``beton`` exists and its metadata says it came from these sources in this mode."""
    try:
        meta = read_metadata(beton)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return (beton.is_file() and meta.get("checksum") == checksum and meta.get("write_mode") == write_mode
            and meta.get("format_version") == FORMAT_VERSION)


def convert_builtin(name: str, out_dir: Path, *, root: Path | None = None,
                    write_mode: str = "raw") -> dict[str, Path]:
    """Write ``{name}_{train,test}.beton`` of the built-in dataset ``name`` (data/builtin.py: 32x32 RGB, the 28 px
    images zero-padded) into ``out_dir``; {"train": .., "test": ..}. ``root`` None: the dataset's own places.

    A split is skipped when its file is already there and its metadata checksum matches the source files (and
    the write mode), so calling this before every study is cheap. A missing source raises FileNotFoundError
    naming where it looked.
    """
    source = BUILTIN[name]
    out_dir = Path(out_dir)
    paths = {}
    for split in SPLITS:
        sources = source.find_sources(split, root)
        checksum = file_checksum(*sources)
        beton = out_dir / f"{name}_{split}.beton"
        if not up_to_date(beton, checksum, write_mode):
            images, labels = source.load(split, root)
            write_beton(to_rgb32(images), labels, beton, source=f"{source.label} {split} ({sources[0].name})",
                        classes=source.classes, write_mode=write_mode, checksum=checksum)
        paths[split] = beton
    return paths


def convert_fashion_mnist(out_dir: Path, *, root: Path = FASHION_MNIST_DIR,
                          write_mode: str = "raw") -> dict[str, Path]:
    """Write ``fashion_mnist_{train,test}.beton`` (32x32 RGB, 60k and 10k images) into ``out_dir``, skipped
    while up to date (``convert_builtin``)."""
    return convert_builtin("fashion_mnist", out_dir, root=root, write_mode=write_mode)
