"""FFCV files whose ``data_dir`` is in object storage (``s3://bucket/prefix``): published once, copied to each node.

FFCV memory-maps a local file, so a node cannot read a .beton from a bucket: the driver converts the dataset
into this machine's cache and uploads it (:func:`prepare_remote`, :func:`publish`); every training process
asks :func:`local_beton` for a path on its own disk, which downloads the file the first time and reuses the copy
while the remote one is unchanged. "Unchanged" is the metadata JSON's ``checksum`` (data/convert.py: what the
file was made from, with which options) plus the file's size, so nothing is hashed at every start.

Ordering, so that a JSON never describes a file it does not match (data/convert.py's rule, kept in the bucket
and in the cache): an upload removes the old remote JSON, uploads the .beton, then the new JSON; a download
writes the JSON it read *before* fetching the .beton (a publish in between then looks stale next time, never
up to date). Several processes of one node (Ray Train ranks, a second study) download once: the check and the
download run under an exclusive ``flock`` of a lock file in the cache folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path

from data import atomic
from data.convert import read_metadata
from data.errors import DatasetError
from data.store import ObjectPath, check_writable, is_remote, local_copy_dir, location, uri_problem

LOCK_NAME = ".ssl-study-download.lock"  # hidden: no *.beton / *.json glob matches it


def _metadata_path(beton: Path | ObjectPath) -> Path | ObjectPath:
    """The metadata JSON next to ``beton``: ``a.beton`` -> ``a.json`` (data/convert.py's ``with_suffix``)."""
    return beton.parent / (beton.name.rpartition(".")[0] + ".json")


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` for the processes of this machine (released when the file closes, also
    when the holder dies)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _local_checksum(beton: Path) -> str | None:
    try:
        return read_metadata(beton).get("checksum")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def publish(local: dict[str, Path], remote_dir: str | ObjectPath) -> dict[str, str]:
    """Upload each split's .beton and metadata JSON to ``remote_dir/<name>``; {split: URI of the remote .beton}.

    A split is skipped when the remote JSON has the local one's checksum and the remote .beton its size, so
    publishing before every study costs two requests per split."""
    remote_dir = location(str(remote_dir))
    uris = {}
    for split, beton in local.items():
        beton = Path(beton)
        target, target_meta = remote_dir / beton.name, _metadata_path(remote_dir / beton.name)
        checksum = _local_checksum(beton)
        try:
            remote_checksum = json.loads(target_meta.read_bytes()).get("checksum")
        except (FileNotFoundError, ValueError, AttributeError):  # none yet, or not a JSON object: replace it
            remote_checksum = None
        if checksum is None or remote_checksum != checksum or target.size() != beton.stat().st_size:
            target_meta.unlink(missing_ok=True)  # (1) no JSON describes the file while it is replaced
            target.upload(beton)  # (2) the .beton...
            target_meta.upload(_metadata_path(beton))  # (3) ...then its JSON: whoever sees it finds this file
        uris[split] = str(target)
    return uris


def prepare_remote(dataset: str, remote_dir: str, **convert_options) -> dict[str, str]:
    """The driver's side: convert ``dataset`` into this machine's copy of ``remote_dir`` (data.datasets.prepare:
    a no-op when up to date), then :func:`publish` it; {"train": URI, "test": URI}. An unusable, unreachable or
    missing bucket is a one-line DatasetError naming ``data_dir`` and the URI, before anything is converted."""
    from data.datasets import prepare  # image folders, FFCV writers: only for the driver

    where = location(str(remote_dir))
    if problem := uri_problem(str(remote_dir)):
        raise DatasetError(f"data_dir: {problem}")
    if problem := check_writable(where, "data_dir"):  # 5 s at most for an unreachable endpoint
        raise DatasetError(problem)
    cache = local_copy_dir(where, kind="data")
    with _locked(cache):  # the workers of this node wait for the conversion instead of downloading its result
        local = prepare(dataset, cache, **convert_options)
        try:
            return publish(local, where)
        except OSError as e:
            raise DatasetError(f"data_dir: {where}: upload failed ({' '.join(str(e).split())[:200]})") from e


def _unreadable(remote: ObjectPath, what: ObjectPath, e: Exception | None = None) -> DatasetError:
    """One line naming ``remote`` (the file asked for), why ``what`` cannot be read, and what publishes it."""
    if not ObjectPath(f"{remote.kind}://{remote.bucket}").exists():
        why = f"bucket {remote.bucket!r} does not exist"
    elif e is None or isinstance(e, FileNotFoundError):
        why = f"{what} does not exist"
    else:
        why = f"{what}: " + " ".join(str(e).split())[:200]
    return DatasetError(f"dataset file {remote}: cannot read it ({why}): run the study, which converts and "
                        f"publishes its dataset to data_dir, or `ssl-study convert` and copy the .beton and .json "
                        f"there")


def local_beton(path: str) -> str:
    """The worker's side: a path on this machine's disk for the .beton ``path``, which is returned unchanged
    when it is local. A URI is copied to ``local_copy_dir(parent)/name`` (with its JSON) unless the copy there has
    the remote JSON's checksum and the remote file's size. A missing remote file or bucket is a one-line
    DatasetError naming the URI."""
    if not is_remote(path):
        return str(path)
    remote = ObjectPath(str(path))
    remote_meta = _metadata_path(remote)
    local = local_copy_dir(remote.parent, kind="data") / remote.name
    with _locked(local.parent):
        try:
            meta_bytes = remote_meta.read_bytes()  # (1) read first: the JSON must not be newer than the file
            checksum = json.loads(meta_bytes).get("checksum")
        except (OSError, ValueError, AttributeError) as e:  # missing, unreachable, not a JSON object
            raise _unreadable(remote, remote_meta, e) from e
        try:
            size = remote.size()
        except OSError as e:
            raise _unreadable(remote, remote, e) from e
        if size is None:
            raise _unreadable(remote, remote)
        if checksum is not None and _local_checksum(local) == checksum and local.is_file() \
                and local.stat().st_size == size:
            return str(local)
        _metadata_path(local).unlink(missing_ok=True)  # (2) no JSON describes a file being replaced
        try:
            remote.download(local)  # (3) a temporary name, then a rename (an open memory map keeps the old file)
        except OSError as e:
            raise _unreadable(remote, remote, e) from e
        atomic.write_bytes(_metadata_path(local), meta_bytes)  # (4) the JSON read in (1)
    return str(local)
