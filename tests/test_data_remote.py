"""data/remote.py on a real S3 server (moto, with authentication): a dataset published to ``s3://`` once, copied
to each node's cache once, and copied again only when the remote file changed or the copy is damaged.

Requests are counted in the server's own request log (one line per request), so a test fails when a file is
downloaded or uploaded more often than it should be.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from servers import s3_server

from data import store
from data.datasets import convert_arrays
from data.errors import DatasetError
from data.remote import local_beton, prepare_remote, publish

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning"
)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("moto")) as s3:
        yield s3


@pytest.fixture
def s3(server, tmp_path, monkeypatch, request):
    """The server's credentials and a cache of this test's own; ``s3.prefix``: a folder of this test's own."""
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SSL_STUDY_CACHE", str(tmp_path / "cache"))
    store._filesystem.cache_clear()  # filesystems are cached per bucket, with the credentials they were made with
    server.prefix = f"s3://{server.bucket}/{request.node.name}"
    yield server
    store._filesystem.cache_clear()


def _arrays(seed: int, n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, n)


@pytest.fixture(scope="module")
def betons(tmp_path_factory) -> dict[str, Path]:
    """Two versions of one dataset file ``d.beton`` (other pixels: another checksum), "old" and "new"."""
    root = tmp_path_factory.mktemp("betons")
    return {version: convert_arrays(*_arrays(seed), root / version / "d.beton", workers=1, progress=False)
            for version, seed in (("old", 0), ("new", 1))}


def _count(s3, pattern: str) -> int:
    """Requests in the server's log whose request line matches ``pattern`` (method and path, e.g. ``GET /b/k``)."""
    return len(re.findall(rf'"(?:\x1b\[[0-9;]*m)*{pattern} HTTP/1\.1', s3.log()))


def _downloads(s3, uri: str) -> int:
    """GET requests for the object ``uri`` (a download reads it in 8 MB ranges: a few per download)."""
    return _count(s3, f"GET /{re.escape(uri.partition('://')[2])}")


def _uploads(s3, prefix: str) -> int:
    """PUT/POST requests (single or multipart uploads) of .beton and .json files in ``prefix`` (not of the probe
    object that prepare_remote's write check puts there and removes)."""
    return _count(s3, rf"(?:PUT|POST) /{re.escape(prefix.partition('://')[2])}/[^ ?/]+\.(?:beton|json)(?:\?[^ ]*)?")


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


# ---------------------------------------------------------------------------------------------- the worker's side


def test_a_published_file_is_copied_byte_for_byte_into_the_cache(s3, betons):
    uris = publish({"train": betons["old"]}, s3.prefix)
    assert uris == {"train": f"{s3.prefix}/d.beton"}
    local = local_beton(uris["train"])
    assert Path(local) == store.local_copy_dir(store.ObjectPath(s3.prefix), kind="data") / "d.beton"
    assert Path(local).read_bytes() == betons["old"].read_bytes()
    assert Path(local).with_suffix(".json").read_bytes() == betons["old"].with_suffix(".json").read_bytes()
    assert _downloads(s3, uris["train"]) > 0  # the log counts downloads: the tests below rely on it


def test_an_unchanged_copy_is_reused_without_a_download(s3, betons):
    uri = publish({"train": betons["old"]}, s3.prefix)["train"]
    local = local_beton(uri)
    stamp, gets = _stamp(local), _downloads(s3, uri)
    assert local_beton(uri) == local
    assert _stamp(local) == stamp  # the same file (inode), not rewritten (mtime)
    assert _downloads(s3, uri) == gets


def test_a_republished_dataset_is_downloaded_again(s3, betons):
    uri = publish({"train": betons["old"]}, s3.prefix)["train"]
    local = local_beton(uri)
    gets = _downloads(s3, uri)
    assert publish({"train": betons["new"]}, s3.prefix)["train"] == uri  # another checksum: uploaded again
    assert local_beton(uri) == local
    assert Path(local).read_bytes() == betons["new"].read_bytes() != betons["old"].read_bytes()
    assert Path(local).with_suffix(".json").read_bytes() == betons["new"].with_suffix(".json").read_bytes()
    assert _downloads(s3, uri) > gets


def test_a_truncated_copy_is_replaced(s3, betons):
    uri = publish({"train": betons["old"]}, s3.prefix)["train"]
    local = local_beton(uri)
    os.truncate(local, os.path.getsize(local) // 2)  # a disk that filled up, a copy made by hand: its JSON is fine
    gets = _downloads(s3, uri)
    assert local_beton(uri) == local
    assert Path(local).read_bytes() == betons["old"].read_bytes()
    assert _downloads(s3, uri) > gets


def _local_beton_in_child(uri: str, barrier, results) -> None:
    barrier.wait(timeout=60)  # both ask at the same moment
    try:
        results.put(("ok", local_beton(uri)))
    except BaseException as e:  # reported to the test, which fails on it
        results.put(("error", repr(e)))


def test_two_processes_of_one_node_download_once(s3, betons):
    single = publish({"train": betons["old"]}, f"{s3.prefix}/single")["train"]
    local_beton(single)
    per_download = _downloads(s3, single)  # the GETs of one download (it reads 8 MB ranges)
    uri = publish({"train": betons["old"]}, f"{s3.prefix}/shared")["train"]
    ctx = mp.get_context("spawn")  # as Ray's worker processes: nothing inherited but the environment
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_local_beton_in_child, args=(uri, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    expected = str(store.local_copy_dir(store.ObjectPath(f"{s3.prefix}/shared"), kind="data") / "d.beton")
    assert got == [("ok", expected)] * 2
    assert Path(expected).read_bytes() == betons["old"].read_bytes()
    assert _downloads(s3, uri) == per_download  # one download, not two


def test_a_local_path_is_returned_unchanged(tmp_path):
    assert local_beton(str(tmp_path / "a.beton")) == str(tmp_path / "a.beton")


def test_a_missing_remote_file_is_a_one_line_dataset_error(s3, betons):
    missing = f"{s3.prefix}/nothing.beton"
    with pytest.raises(DatasetError) as e:
        local_beton(missing)
    message = str(e.value)
    assert "\n" not in message and missing in message and "nothing.json does not exist" in message
    assert "run the study" in message and "ssl-study convert" in message
    uri = publish({"train": betons["old"]}, s3.prefix)["train"]
    store.ObjectPath(uri).unlink()  # its JSON without the file
    with pytest.raises(DatasetError, match=rf"^dataset file {re.escape(uri)}: cannot read it \({re.escape(uri)} "
                                           r"does not exist\)[^\n]*ssl-study convert"):
        local_beton(uri)


def test_a_missing_bucket_is_a_one_line_dataset_error(s3, tmp_path):
    data_dir = "s3://no-such-bucket-here/data"
    with pytest.raises(DatasetError) as e:
        prepare_remote(str(tmp_path), data_dir)  # refused before anything is converted
    assert "\n" not in str(e.value) and str(e.value).startswith(f"data_dir: {data_dir}: ")
    assert "bucket 'no-such-bucket-here' does not exist" in str(e.value)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(DatasetError) as e:
        local_beton(f"{data_dir}/d.beton")
    assert "\n" not in str(e.value) and f"{data_dir}/d.beton" in str(e.value)
    assert "bucket 'no-such-bucket-here' does not exist" in str(e.value)


# ---------------------------------------------------------------------------------------------- the driver's side


def test_publishing_an_unchanged_dataset_again_uploads_nothing(s3, betons):
    first = publish({"train": betons["old"]}, s3.prefix)
    uploads = _uploads(s3, s3.prefix)
    assert uploads >= 2  # the .beton and its JSON: the count sees uploads
    assert publish({"train": betons["old"]}, s3.prefix) == first
    assert _uploads(s3, s3.prefix) == uploads


def test_prepare_remote_converts_publishes_and_the_driver_reuses_its_conversion(s3, tmp_path):
    folder = tmp_path / "images"
    for split in ("train", "val"):
        for c, colour in enumerate(((200, 30, 90), (20, 160, 40))):
            (folder / split / f"class_{c}").mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (12, 12), (*colour, 30 * i)).save(folder / split / f"class_{c}" / f"{i}.png")
    uris = prepare_remote(str(folder), s3.prefix, workers=1)
    assert uris == {"train": f"{s3.prefix}/images_train.beton", "test": f"{s3.prefix}/images_val.beton"}
    cache = store.local_copy_dir(store.ObjectPath(s3.prefix), kind="data")
    for uri in uris.values():
        copy = cache / store.ObjectPath(uri).name
        assert local_beton(uri) == str(copy)  # a worker on the driver's node: the conversion is its copy
        assert _downloads(s3, uri) == 0
        assert store.ObjectPath(uri).read_bytes() == copy.read_bytes()
    uploads = _uploads(s3, s3.prefix)
    assert prepare_remote(str(folder), s3.prefix, workers=1) == uris  # up to date: converted and uploaded once
    assert _uploads(s3, s3.prefix) == uploads
