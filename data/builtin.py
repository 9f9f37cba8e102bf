"""The built-in datasets, by name: where each one's source files are and how to read them.

Each entry is converted the same way (data/convert.py ``convert_builtin``): 28 px grey images zero-padded to
32 px RGB, stored raw, one ``{name}_{split}.beton`` per split, skipped while up to date with the source files.
Adding a dataset of that kind is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data import fashion_mnist, mnist

SPLITS = fashion_mnist.SPLITS


@dataclass(frozen=True)
class BuiltinSource:
    """One built-in dataset. ``root`` None means the source's own default places."""

    name: str  # the dataset name users give, and the output file prefix: {name}_{split}.beton
    label: str  # how the metadata "source" string names it: "{label} {split} ({first source file})"
    classes: tuple[str, ...]
    find_sources: Callable[[str, Path | None], tuple[Path, ...]]  # FileNotFoundError naming where it looked
    load: Callable[[str, Path | None], tuple[np.ndarray, np.ndarray]]  # uint8 [N, 28, 28], int64 [N]


def _fashion_root(root: Path | None) -> Path:
    return fashion_mnist.FASHION_MNIST_DIR if root is None else Path(root)


BUILTIN: dict[str, BuiltinSource] = {
    "fashion_mnist": BuiltinSource(
        "fashion_mnist", "fashion-mnist", fashion_mnist.CLASSES,
        find_sources=lambda split, root: fashion_mnist.split_files(split, _fashion_root(root)),
        load=lambda split, root: fashion_mnist.load_fashion_mnist(split, _fashion_root(root))),
    "mnist": BuiltinSource("mnist", "mnist", mnist.CLASSES, find_sources=mnist.find_sources, load=mnist.load_mnist),
}
