"""Fashion-MNIST from the gzipped IDX files of the Debian package ``dataset-fashion-mnist``."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

SPLITS = ("train", "test")
_PREFIX = {"train": "train", "test": "t10k"}

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file into an array of its declared shape (native byte order)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncation is an EOFError
        raise ValueError(f"{path}: not a readable gzip file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: bad IDX magic number {raw[:4].hex()!r}")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header truncated")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX body has {len(raw) - header} bytes, shape {shape} needs {expected}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def split_files(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[Path, Path]:
    """The (images, labels) gz files of ``split``; raises if the split is unknown or a file is missing."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: accepted values are {', '.join(SPLITS)}")
    root = Path(root)
    files = (root / f"{_PREFIX[split]}-images-idx3-ubyte.gz", root / f"{_PREFIX[split]}-labels-idx1-ubyte.gz")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {f} not found: install the Debian package dataset-fashion-mnist "
                "(`make setup` does it)"
            )
    return files


def load_fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of ``split`` ("train" or "test")."""
    image_file, label_file = split_files(split, root)
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.dtype != np.uint8 or images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{image_file} / {label_file}: expected uint8 [N, H, W] images and [N] labels, "
            f"got {images.dtype} {images.shape} and {labels.shape}"
        )
    return images, labels.astype(np.int64)
