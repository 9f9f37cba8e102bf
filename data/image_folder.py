"""ImageNet-style image folders: find the images and classes, and write each split to an FFCV file.

Layouts accepted (class = sub-folder name, sorted; images may sit in nested folders below their class):

- ``root/train/<class>/...`` and ``root/val/<class>/...`` (``test/`` is accepted in place of ``val/``);
- ``root/<class>/...``: a flat class folder, split into train / val by ``val_fraction`` (per class, by a
  hash of each file's relative path, so the split is stable when files are added).

Files whose extension is not an image's are ignored and counted; so are hidden files and what is not a
regular file (a broken link, a pipe). Any file name works, non-UTF-8 bytes included.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data.errors import DatasetError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
EVAL_SPLIT_NAMES = ("val", "test")
_MAX_PAGE = 64 << 20  # FFCV page (holds one sample) when max_resolution is not given
_CHUNK = 64  # images per work item of FFCV's writer processes
HEADER_SAMPLE = 64  # image headers read (not decoded) to estimate the output size: well under a second
JPEG_SAMPLE = 8  # of those, images decoded and JPEG-encoded to measure JPEG bytes / raw bytes


@dataclass
class FolderScan:
    """What scan() found: per split a list of (path, label); the sorted class names; ignored files."""

    root: Path
    layout: str  # "train/val" or "flat"
    classes: list[str]
    splits: dict[str, list[tuple[Path, int]]]
    ignored: dict[str, int] = field(default_factory=dict)  # split -> count of non-image files

    def checksum(self, options: dict) -> str:
        """sha256 over each input's relative path, size and mtime, its label, and the conversion options:
        a changed, added or removed image (or other options) gives another checksum, without reading pixels.
        Names are hashed as their bytes on disk (os.fsencode: the same as UTF-8 for UTF-8 names)."""
        digest = hashlib.sha256(repr(sorted(options.items())).encode())
        digest.update(os.fsencode("\0".join(self.classes)))
        for split, items in sorted(self.splits.items()):
            for path, label in items:
                st = path.stat()
                digest.update(os.fsencode(f"{split}\0{path.relative_to(self.root)}\0{st.st_size}\0"
                                          f"{st.st_mtime_ns}\0{label}\n"))
        return digest.hexdigest()


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files_of(class_dir: Path) -> tuple[list[Path], int]:
    """Image files under ``class_dir`` (recursively, sorted) and the count of other files."""
    images, other = [], 0
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if _is_image(p) and p.is_file():  # not a broken link, and not a pipe: PIL would wait on it forever
                images.append(p)
            else:
                other += 1
    return images, other


def _read_split(folder: Path, classes: list[str] | None) -> tuple[list[str], list[tuple[Path, int]], int]:
    dirs = _class_dirs(folder)
    if not dirs:
        what = "is empty" if not any(folder.iterdir()) else "has no class sub-folders (one sub-folder per class)"
        raise DatasetError(f"image folder {folder} {what}: expected {folder}/<class>/<images>")
    names = [d.name for d in dirs]
    if classes is None:
        classes = names
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise DatasetError(f"{folder}: classes {unknown} are not among the training classes {classes}")
    items, ignored, empty = [], sum(1 for p in folder.iterdir() if p.is_file()), []
    for d in dirs:
        files, other = _files_of(d)
        ignored += other
        if not files:
            empty.append(d.name)
        items += [(p, classes.index(d.name)) for p in files]
    if empty:
        raise DatasetError(f"{folder}: class folder(s) {empty} hold no image files "
                           f"(accepted extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return classes, items, ignored


def _split_by_hash(root: Path, items: list[tuple[Path, int]], n_classes: int,
                   val_fraction: float) -> tuple[list, list]:
    """Per class, the round(n * val_fraction) files with the smallest hash of their relative path are val, but
    at most n - 1: every class keeps a training image (a class of one image is train only)."""
    train, val = [], []
    for c in range(n_classes):
        mine = [it for it in items if it[1] == c]
        mine.sort(key=lambda it: hashlib.sha1(os.fsencode(it[0].relative_to(root))).hexdigest())
        k = min(round(len(mine) * val_fraction), len(mine) - 1)
        val += sorted(mine[:k])
        train += sorted(mine[k:])
    return train, val


def scan(root: Path, val_fraction: float = 0.1) -> FolderScan:
    """Find the classes and images of ``root`` (see the module docstring); DatasetError on bad layouts."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root} is a file, not a folder: expected an ImageNet-style image folder "
                           "(an archive such as .tar or .zip must be extracted first)")
    if (root / "train").is_dir():
        eval_dir = next((root / n for n in EVAL_SPLIT_NAMES if (root / n).is_dir()), None)
        if eval_dir is None:
            raise DatasetError(f"{root} has train/ but no {' or '.join(n + '/' for n in EVAL_SPLIT_NAMES)} folder")
        classes, train, ig_train = _read_split(root / "train", None)
        _, val, ig_val = _read_split(eval_dir, classes)
        return FolderScan(root, "train/val", classes, {"train": train, "val": val},
                          {"train": ig_train, "val": ig_val})
    if not 0 < val_fraction < 1:
        raise DatasetError(f"{root} has no train/ and val/ folders, so it is split by val_fraction, which must be "
                           f"in (0, 1); got {val_fraction}")
    classes, items, ignored = _read_split(root, None)
    train, val = _split_by_hash(root, items, len(classes), val_fraction)
    if not train or not val:
        raise DatasetError(f"{root}: {len(items)} images are too few for a train/val split at "
                           f"val_fraction {val_fraction} (each class keeps one training image): add images, "
                           "raise val_fraction, or give train/ and val/ folders")
    return FolderScan(root, "flat", classes, {"train": train, "val": val}, {"train": ignored, "val": 0})


def capped_size(width: int, height: int, max_resolution: int | None) -> tuple[int, int]:
    """(width, height) after FFCV's resizer caps the longest side at ``max_resolution`` (it truncates)."""
    ratio = max_resolution / max(width, height) if max_resolution else 1.0
    return (int(ratio * width), int(ratio * height)) if ratio < 1 else (width, height)


def load_image(path: Path, max_resolution: int | None) -> np.ndarray:
    """uint8 [H, W, 3] RGB pixels of ``path``, longest side cut to ``max_resolution`` with FFCV's own resizer
    (cv2 INTER_AREA), so the statistics below describe exactly what is stored. Fully decoded, so truncated
    files raise here (OSError), not later."""
    from ffcv.fields.rgb_image import resizer  # FFCV only where a file is read or written: importing it costs 4 s

    with Image.open(path) as im:
        im.load()
        rgb = np.asarray(im.convert("RGB"))
    if 0 in capped_size(rgb.shape[1], rgb.shape[0], max_resolution):  # cv2 would fail with a cryptic assertion
        raise ValueError(f"{rgb.shape[1]}x{rgb.shape[0]} px: its short side would be 0 px at max_resolution "
                         f"{max_resolution}")
    return np.ascontiguousarray(resizer(rgb, max_resolution))


class _FolderDataset:
    """Indexed (image, label) view for FFCV's DatasetWriter that never raises.

    FFCV's writer waits forever for a worker that raised, so a failing image is replaced by a 1x1 black
    placeholder and flagged in shared memory (``failed``); per-image channel sums go to shared memory too.
    The writer forks its workers, so these shared arrays, made here first, are shared with them.
    """

    def __init__(self, items: list[tuple[Path, int]], max_resolution: int | None, max_bytes: int) -> None:
        self.items, self.max_resolution, self.max_bytes = items, max_resolution, max_bytes
        self.failed = mp.RawArray("b", len(items))
        self.sums = np.frombuffer(mp.RawArray("d", 7 * len(items)), dtype=np.float64).reshape(-1, 7)
        self.sizes = np.frombuffer(mp.RawArray("i", 2 * len(items)), dtype=np.int32).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.items[i]
        try:
            image = load_image(path, self.max_resolution)
            if image.nbytes > self.max_bytes:
                raise ValueError(f"{image.shape} is too large: pass max_resolution")
        except Exception:  # anything: a raising worker would hang the writer
            self.failed[i] = 1
            return np.zeros((1, 1, 3), np.uint8), label
        px = image.reshape(-1, 3).astype(np.float64)
        self.sums[i, :3] = px.sum(0)
        self.sums[i, 3:6] = (px * px).sum(0)
        self.sums[i, 6] = len(px)
        self.sizes[i] = image.shape[:2]
        return image, label


def first_failure(items: list[tuple[Path, int]], max_resolution: int | None) -> str:
    """Why an image failed (decoded again in this process, to name the error)."""
    path = items[0][0]
    try:
        load_image(path, max_resolution)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "too large for an FFCV page: pass max_resolution"


def _page_size(max_resolution: int | None) -> tuple[int, int]:
    """(largest raw image accepted, FFCV page size): a power-of-two page that holds any one sample, even a JPEG
    larger than raw, so no worker hits FFCV's MemoryError, which would hang the writer."""
    max_bytes = 3 * max_resolution ** 2 if max_resolution else _MAX_PAGE // 2
    return max_bytes, max(8 << 20, 1 << (2 * max_bytes).bit_length())


@dataclass(frozen=True)
class SizeEstimate:
    """What write_split will write for some images, estimated from a sample of them before writing."""

    images: int
    file_bytes: int  # the .beton: FFCV's page-aligned header, whole data pages, allocation table
    payload_bytes: int  # the image records alone: raw h*w*3 bytes, JPEG at ``jpeg_fraction`` of that
    jpeg_share: float  # share of the sampled images stored as JPEG
    jpeg_fraction: float | None  # JPEG bytes / raw bytes measured on sample images; None when none is JPEG
    unreadable: tuple[tuple[Path, str], ...]  # sampled files that cannot be stored, with why


def estimate_size(items: list[tuple[Path, int]], *, max_resolution: int | None, write_mode: str,
                  jpeg_quality: int, smart_threshold: int, workers: int) -> SizeEstimate:
    """Estimate the FFCV file of ``items`` cheaply: HEADER_SAMPLE evenly spaced images give their size from
    the header alone (PIL reads no pixels until asked), capped as FFCV caps; raw images take h*w*3 bytes;
    JPEG ones the fraction measured by decoding, capping and encoding (FFCV's encoder) JPEG_SAMPLE of them."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.rgb_image import encode_jpeg
    from ffcv.types import (  # FFCV only here: 4 s to import
        ALLOC_TABLE_TYPE,
        FieldDescType,
        HeaderType,
        get_metadata_type,
    )

    sample = [items[round(i)][0] for i in np.linspace(0, len(items) - 1, min(len(items), HEADER_SAMPLE))]
    max_bytes, page = _page_size(max_resolution)
    sides, unreadable = {}, []  # path -> capped (width, height)
    for path in sample:
        try:
            with Image.open(path) as im:
                w, h = capped_size(*im.size, max_resolution)
        except Exception as e:  # PIL raises many types for bad files; any of them makes the file unusable
            unreadable.append((path, f"{type(e).__name__}: {e}"))
            continue
        if w * h * 3 > max_bytes:
            unreadable.append((path, f"{w}x{h} is too large for an FFCV page: pass max_resolution"))
        elif not w or not h:
            unreadable.append((path, f"its short side would be 0 px at max_resolution {max_resolution}"))
        else:
            sides[path] = (w, h)
    as_jpeg = [p for p, (w, h) in sides.items()
               if write_mode == "jpg" or (write_mode == "smart" and w * h * 3 > smart_threshold)]
    fraction = None
    if as_jpeg:
        jpeg = raw = 0
        for path in as_jpeg[::max(1, len(as_jpeg) // JPEG_SAMPLE)][:JPEG_SAMPLE]:
            try:
                image = load_image(path, max_resolution)
            except Exception as e:  # a truncated file fails only when decoded
                unreadable.append((path, f"{type(e).__name__}: {e}"))
                del sides[path]
                continue
            jpeg, raw = jpeg + encode_jpeg(image, jpeg_quality).nbytes, raw + image.nbytes
        fraction = jpeg / raw if raw else 1.0
    sizes = [w * h * 3 * (fraction if p in as_jpeg else 1) for p, (w, h) in sides.items()]
    payload = int(len(items) * np.mean(sizes)) if sizes else 0
    # FFCV aligns the data region to a page, and each writer process fills pages of its own, ending on a
    # part-filled one; the allocation table follows the pages.
    active = min(max(1, workers), math.ceil(len(items) / _CHUNK))
    sample_record = get_metadata_type([RGBImageField(), IntField()]).itemsize  # FFCV's per-sample record (24 B)
    index = HeaderType.itemsize + 2 * FieldDescType.itemsize + sample_record * len(items)
    file_bytes = (math.ceil(index / page) + math.ceil(payload / page) + active - 1) * page \
        + ALLOC_TABLE_TYPE.itemsize * len(items)
    jpeg_share = len([p for p in as_jpeg if p in sides]) / max(1, len(sides))
    return SizeEstimate(len(items), file_bytes, payload, jpeg_share, fraction, tuple(unreadable))


def write_split(items: list[tuple[Path, int]], tmp: Path, *, max_resolution: int | None, write_mode: str,
                jpeg_quality: int, smart_threshold: int, workers: int) -> tuple[np.ndarray, dict]:
    """Write ``items`` to the FFCV file ``tmp``; returns (indices of failed images, stats of the good ones,
    "jpeg_images" among them: how many FFCV stored as JPEG)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.rgb_image import IMAGE_MODES  # FFCV only where a file is read or written: importing it costs 4 s
    from ffcv.writer import DatasetWriter

    max_bytes, page = _page_size(max_resolution)
    dataset = _FolderDataset(items, max_resolution, max_bytes)
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                               smart_threshold=smart_threshold),
        "label": IntField(),
    }
    writer = DatasetWriter(str(tmp), fields, page_size=page, num_workers=max(1, workers))
    writer.from_indexed_dataset(dataset, chunksize=_CHUNK)
    failed = np.flatnonzero(np.frombuffer(dataset.failed, dtype=np.int8))
    good = np.setdiff1d(np.arange(len(items)), failed)
    sums = dataset.sums[good].sum(0)
    n = max(sums[6], 1.0)
    mean = sums[:3] / n
    std = np.sqrt(np.maximum(sums[3:6] / n - mean ** 2, 0.0))
    sizes = dataset.sizes[good]
    stats = {"mean": mean.tolist(), "std": std.tolist(),
             "max_height": int(sizes[:, 0].max(initial=0)), "max_width": int(sizes[:, 1].max(initial=0)),
             "min_side": int(sizes.min()) if len(sizes) else 0,
             "jpeg_images": int((_image_modes(tmp)[good] == IMAGE_MODES["jpg"]).sum())}
    return failed, stats


def _image_modes(beton: Path) -> np.ndarray:
    """Per sample, how FFCV stored the ``image`` field (IMAGE_MODES: raw or jpg), read from the file itself."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    return reader.metadata[f"f{reader.field_names.index('image')}"]["mode"]  # FFCV names the columns by position


def make_synthetic_folder(root: Path, *, per_class: int, classes: int = 10, sizes: tuple[int, int] = (300, 500),
                          layout: str = "train/val", val_per_class: int = 0, seed: int = 0,
                          quality: int = 90) -> Path:
    """An ImageNet-style folder of colour JPEGs made from Fashion-MNIST images (for tests and bench/loader.py).

    Each image: a Fashion-MNIST item of the class, upscaled (bicubic) to a random W x H in ``sizes``, tinted with
    a random colour over a random colour gradient, plus Gaussian noise; so JPEG decode and colour ops do real work.
    ``layout`` "train/val" writes root/{train,val}/<class>/, "flat" writes root/<class>/ (train + val counts).
    """
    from data.fashion_mnist import load_fashion_mnist

    rng = np.random.default_rng(seed)
    images, labels = load_fashion_mnist("test")
    root = Path(root)
    parts = {"train": per_class, "val": val_per_class} if layout == "train/val" else {"": per_class + val_per_class}
    for part, count in parts.items():
        for c in range(classes):
            folder = root / part / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            pool = np.flatnonzero(labels == c % 10)
            for k in range(count):
                w, h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
                grey = Image.fromarray(images[pool[rng.integers(len(pool))]]).resize((w, h), Image.BICUBIC)
                g = np.asarray(grey, dtype=np.float32)[..., None] / 255.0
                ramp = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
                back = rng.uniform(0, 255, 3) * (1 - ramp) + rng.uniform(0, 255, 3) * ramp
                fore = rng.uniform(60, 255, 3)
                pixels = g * fore + (1 - g) * back + rng.normal(0, 8, (h, w, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    folder / f"img_{k:05d}.jpg", quality=quality)
    return root
