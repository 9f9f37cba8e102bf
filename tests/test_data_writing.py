"""data/convert.py's writing through data/atomic.py (the temp files of killed writers are swept, the metadata JSON
never describes a file it does not match) and the table of built-in sources, data/builtin.py."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ffcv.reader import Reader

from data import atomic, mnist
from data.builtin import BUILTIN, BuiltinSource
from data.convert import file_checksum, read_metadata, up_to_date, writing_beton
from data.datasets import DatasetError, check, convert, convert_arrays

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning"
)


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _arrays(n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    return rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), rng.integers(0, 3, n)


def test_a_conversion_sweeps_the_temp_files_of_dead_writers(tmp_path):
    dead = _dead_pid()
    stale = [tmp_path / f".a.beton.{atomic._HOST}.{dead}.x1y2z3.tmp",  # data/atomic.py's name
             tmp_path / f".a.beton.{dead}.tmp",  # the name before it: one left per killed conversion
             tmp_path / f".a.json.{dead}.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    out = convert_arrays(*_arrays(), tmp_path / "a.beton", progress=False)
    assert [p for p in stale if p.exists()] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.beton", "a.json"]
    assert Reader(str(out)).num_samples == read_metadata(out)["count"] == 20


def test_the_temp_files_of_live_writers_are_kept(tmp_path):
    live = [tmp_path / f".a.beton.{atomic._HOST}.{os.getpid()}.k9k9k9.tmp", tmp_path / f".a.beton.{os.getpid()}.tmp"]
    for p in live:
        p.write_bytes(b"being written")
    convert_arrays(*_arrays(), tmp_path / "a.beton", progress=False)
    assert all(p.read_bytes() == b"being written" for p in live)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["a.beton", "a.json"]


def test_writing_beton_keeps_the_old_pair_on_error_and_drops_the_old_json_on_success(tmp_path):
    beton = convert_arrays(*_arrays(), tmp_path / "a.beton", progress=False)
    before = beton.read_bytes(), beton.with_suffix(".json").read_bytes()
    checksum = read_metadata(beton)["checksum"]
    with pytest.raises(RuntimeError), writing_beton(beton) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert (beton.read_bytes(), beton.with_suffix(".json").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.beton", "a.json"]  # the temp file went too
    with writing_beton(beton) as tmp:
        shutil.copy(beton, tmp)
        assert beton.with_suffix(".json").exists()  # a reader still sees the old, complete pair
    assert beton.read_bytes() == before[0] and not beton.with_suffix(".json").exists()
    assert not up_to_date(beton, checksum, "raw")  # no JSON, so converted again next time


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_a_builtin_source_is_one_table_entry(tmp_path, monkeypatch):
    """check and convert find a new entry of the table (here MNIST's reader on IDX files in tmp_path)."""
    monkeypatch.setitem(BUILTIN, "tiny", BuiltinSource(
        "tiny", "tiny-mnist", mnist.CLASSES, find_sources=lambda split, root: mnist.find_sources(split, tmp_path),
        load=lambda split, root: mnist.load_mnist(split, tmp_path)))
    with pytest.raises(DatasetError, match=f"dataset 'tiny': MNIST train not found: looked for .* in {tmp_path}"):
        check("tiny", tmp_path / "d")
    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        images, labels = mnist.idx_files(split, tmp_path)
        _write_idx(images, rng.integers(0, 256, (7, 28, 28), dtype=np.uint8))
        _write_idx(labels, rng.integers(0, 10, 7))
    check("tiny", tmp_path / "d")
    paths = convert("tiny", tmp_path / "out", progress=False, max_resolution=8)  # cap: image folders only
    assert [p.name for p in paths.values()] == ["tiny_train.beton", "tiny_test.beton"]
    meta = read_metadata(paths["test"])
    assert meta["source"] == "tiny-mnist test (t10k-images-idx3-ubyte.gz)" and meta["write_mode"] == "raw"
    assert meta["resolution"] == 32 and meta["count"] == 7 and meta["classes"] == list(mnist.CLASSES)
    assert meta["checksum"] == file_checksum(*mnist.idx_files("test", tmp_path))
    assert list(BUILTIN)[:2] == ["fashion_mnist", "mnist"]
