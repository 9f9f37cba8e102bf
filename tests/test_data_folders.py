"""Image folders through ``ssl-study convert``'s arguments: capped at 256 px and stored smart by default, raw and
full size on request, the size estimate printed before writing (and checked against the free space), and the
progress bar."""

from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.reader import Reader
from PIL import Image

from data.convert import SMART_THRESHOLD, read_metadata
from data.datasets import DatasetError, add_convert_arguments, convert, convert_from_args
from data.image_folder import capped_size, estimate_size, make_synthetic_folder, scan

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning"
)
TQDM = re.compile(r"\d+/\d+ \[\d\d:\d\d<\d\d:\d\d")  # tqdm's "done/total [elapsed<remaining"
UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """2 classes x (10 train + 2 val) JPEGs of 280-320 px, above the 256 px cap, plus one 64 px image, under
    the smart threshold (96 x 96 px)."""
    root = make_synthetic_folder(tmp_path_factory.mktemp("photos") / "photos", per_class=10, val_per_class=2,
                                 classes=2, sizes=(280, 320))
    Image.new("RGB", (64, 48), (200, 30, 90)).save(root / "train" / "class_01" / "small.png")
    return root


def _parse(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def _stored(beton: Path) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Per sample, how FFCV stored the image (IMAGE_MODES) and its (width, height), read from the file."""
    reader = Reader(str(beton))
    image = reader.metadata[f"f{reader.field_names.index('image')}"]
    return image["mode"], list(zip(image["width"].tolist(), image["height"].tolist(), strict=True))


def _estimate(line: str) -> float:
    value, unit = re.search(r" to ~([\d.]+) (\w+) ", line).groups()
    return float(value) * UNITS[unit]


def test_default_is_256_px_smart_with_an_estimate_line_and_a_progress_bar(photos, tmp_path, capsys):
    assert convert_from_args(_parse(photos, tmp_path / "out")) == 0
    out, err = capsys.readouterr()
    beton = tmp_path / "out" / "photos_train.beton"
    items = scan(photos).splits["train"]
    meta = read_metadata(beton)
    assert meta["write_mode"] == "smart" and meta["options"]["max_resolution"] == 256 and meta["resolution"] == 256
    assert meta["count"] == 21 and meta["jpeg_images"] == 20  # the 64 px image is under the threshold: raw
    modes, sizes = _stored(beton)
    assert sizes == [capped_size(*Image.open(p).size, 256) for p, _ in items]
    assert max(max(s) for s in sizes) == 256 and (64, 48) in sizes
    small = [i for i, (p, _) in enumerate(items) if p.name == "small.png"]
    assert modes[small].tolist() == [IMAGE_MODES["raw"]] and (np.delete(modes, small) == IMAGE_MODES["jpg"]).all()
    assert out.splitlines()[0].startswith("train: 21 images, 2 classes, resolution 256 px, smart (20 as JPEG)")

    lines = [line for line in err.splitlines() if line.startswith("converting")]
    assert len(lines) == 2 and lines[0].startswith(f"converting 21 images of {photos} (train) to ~")
    assert "at <= 256 px, smart (JPEG q90 for 95% of the images, ~" in lines[0]
    assert f"-> {beton} (" in lines[0] and lines[0].endswith(" free)")
    real = beton.stat().st_size
    assert real / 3 < _estimate(lines[0]) < real * 3
    # The image records alone (FFCV's 8 MiB pages dominate so small a file): from 8 of 20 JPEGs measured.
    estimate = estimate_size(items, max_resolution=256, write_mode="smart", jpeg_quality=90,
                             smart_threshold=SMART_THRESHOLD, workers=2)
    payload = int(Reader(str(beton)).alloc_table["size"].sum())
    assert 1 / 1.5 < estimate.payload_bytes / payload < 1.5, (estimate, payload)
    assert TQDM.search(err), err  # FFCV's writer's bar, on by default


def test_raw_at_full_size_on_request_without_a_progress_bar(photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert_from_args(_parse(photos, out, "--write-mode", "raw", "--max-resolution", "0", "--no-progress")) == 0
    err = capsys.readouterr().err
    beton = out / "photos_train.beton"
    meta = read_metadata(beton)
    assert meta["write_mode"] == "raw" and meta["options"]["max_resolution"] is None and meta["jpeg_images"] == 0
    modes, sizes = _stored(beton)
    assert sizes == [Image.open(p).size for p, _ in scan(photos).splits["train"]] and meta["resolution"] == 320
    assert (modes == IMAGE_MODES["raw"]).all()
    lines = [line for line in err.splitlines() if line.startswith("converting")]
    assert len(lines) == 2 and "at full resolution, raw -> " in lines[0]
    assert beton.stat().st_size / 3 < _estimate(lines[0]) < beton.stat().st_size * 3
    assert not TQDM.search(err)
    stamp = beton.stat().st_mtime_ns  # None says "no cap" as 0 does: the same options, so nothing to do
    convert(photos, out, write_mode="raw", max_resolution=None, progress=False, log=lines.append)
    assert beton.stat().st_mtime_ns == stamp and len(lines) == 2


def test_not_enough_free_space_stops_before_writing(tmp_path):
    """Images of 9000 x 9000 px (243 MB each raw; PIL warns above 89 Mpx), as hard links of one PNG of a few
    kB, until they would not fit in the free space."""
    src = tmp_path / "big"
    first = src / "train" / "white" / "0.png"
    first.parent.mkdir(parents=True)
    Image.new("1", (9_000, 9_000), 1).save(first)
    count = int(shutil.disk_usage(tmp_path).free * 1.1) // (3 * 9_000 ** 2) + 2
    for k in range(1, count):
        os.link(first, first.with_name(f"{k}.png"))
    (src / "val" / "white").mkdir(parents=True)
    os.link(first, src / "val" / "white" / "0.png")
    lines = []
    with pytest.raises(DatasetError) as err:
        convert(src, tmp_path / "out", write_mode="raw", max_resolution=9_000, progress=False, log=lines.append)
    message = str(err.value)
    assert message.startswith(f"output folder {tmp_path / 'out'} has ") and "--max-resolution" in message
    assert f"free, but converting {count + 1:,} images of {src} needs ~" in message
    assert lines == [] and list((tmp_path / "out").iterdir()) == []
