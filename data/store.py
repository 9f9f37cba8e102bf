"""Where a file lives: a path on this machine (a local disk or an NFS mount) or an object in object storage
(``s3://bucket/key``, ``gs://bucket/key``), through pyarrow's filesystems.

:func:`location` turns either into something with the part of :class:`pathlib.Path` this project uses
(``/``, ``name``, ``parent``, ``exists``, ``is_file``, ``is_dir``, ``glob``, ``read_bytes``, ``write_bytes``,
``unlink``, ...): a ``Path`` for a local path, an :class:`ObjectPath` for an object, so that the results
tables, the saved study and the trial logs are written and read by one piece of code wherever they live.
``str()`` of either is what Ray's own storage support takes (``RunConfig(storage_path=...)``).

Atomic writes: on a disk, :func:`write_bytes` writes a temporary file and renames it (data/atomic.py). An object
store has no rename, but an object appears whole when its upload ends and a reader sees the old object until
then, so there the write goes straight to its name: a reader never sees a partial file either way.

Endpoint and credentials come from the environment only, as for every AWS and Google tool:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or an instance role), ``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL`` for an S3-compatible server (MinIO, Ceph, moto), ``GOOGLE_APPLICATION_CREDENTIALS``. A URI
that carries options (``?endpoint_override=``, ``?access_key=``) is refused by :func:`uri_problem`: the study file
and its saved copy would show them.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from data import atomic

if TYPE_CHECKING:
    import pyarrow.fs as pafs

OBJECT_SCHEMES = ("s3", "gs", "gcs")
ACCEPTED = "a path, file:///abs/path, s3://bucket/prefix or gs://bucket/prefix"
CHECK_TIMEOUT_S = 5  # check_writable: an unreachable endpoint is an error after this, not after SDK retries


def scheme(where: str | Path) -> str:
    """``s3``, ``gs``, ``file``, or ``""`` for a plain path."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", str(where))
    return match[1].lower() if match else ""


def is_remote(where: str | Path) -> bool:
    """Whether ``where`` is an object-storage URI (files there are not on any node's disk)."""
    return scheme(where) in OBJECT_SCHEMES


def is_shared(path: str) -> bool:
    """Whether every node can reach ``path``: object storage (s3://, gs://) or a path on a network file system."""
    if is_remote(path):
        return True
    path = os.path.realpath(str(location(path)))
    best, fstype = "", ""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, point, kind, *_ = line.split()
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, fstype = point, kind
    return fstype.startswith(("nfs", "cifs", "smb", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "fuse."))


def uri_problem(where: str) -> str | None:
    """Why ``where`` is not a usable location (one line, naming what is accepted), or None. No connection."""
    kind = scheme(where)
    if not kind:
        return None
    where = re.sub(r"^([^:]+://)[^/@]*@", r"\1***@", where)  # credentials in it are not repeated
    if kind == "file":
        return None if where[len("file://"):].startswith("/") else \
            f"{where!r}: a file URI needs an absolute path, file:///abs/path (three slashes); accepted: {ACCEPTED}"
    if kind not in OBJECT_SCHEMES:
        return f"{where!r}: unknown scheme {kind!r}; accepted: {ACCEPTED}"
    if "?" in where or "#" in where or "***@" in where:
        return (f"{where!r}: give the bare URI, {kind}://bucket/prefix: options and credentials come from the "
                f"environment (AWS_ENDPOINT_URL for an S3-compatible server, AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS), never from a file the study saves")
    bucket = where.partition("://")[2].partition("/")[0]
    if not bucket:
        return f"{where!r}: no bucket; accepted: {ACCEPTED}"
    return None


def location(where: str | Path) -> Path | ObjectPath:
    """``where`` as a :class:`~pathlib.Path` (a plain path or ``file://``) or an :class:`ObjectPath` (an object
    store URI)."""
    if isinstance(where, (Path, ObjectPath)):
        return where
    kind = scheme(where)
    if kind in OBJECT_SCHEMES:
        return ObjectPath(where)
    return Path(where[len("file://"):] if kind == "file" else where)


@cache
def _filesystem(kind: str, bucket: str) -> pafs.FileSystem:
    """One filesystem per bucket (an S3 client resolves the bucket's region when it is made)."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(f"{kind}://{bucket}")[0]


class ObjectPath:
    """An object (or a prefix: a "directory") in object storage, with the :class:`pathlib.Path` methods this
    project uses. Directories are implicit: ``mkdir`` does nothing, ``is_dir`` is true when any object has the
    prefix."""

    def __init__(self, uri: str) -> None:
        kind, _, rest = uri.partition("://")
        self.kind = kind.lower()
        self.key = posixpath.normpath(rest).strip("/")  # bucket/key..., as pyarrow's filesystem names it
        self.bucket = self.key.partition("/")[0]

    # ----------------------------------------------------------------------------------------- naming
    def __str__(self) -> str:
        return f"{self.kind}://{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __fspath__(self) -> str:  # so that open(), os.path and friends refuse it loudly instead of a local path
        raise TypeError(f"{self} is in object storage, not on this machine's disk")

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, part: str | Path) -> ObjectPath:
        return ObjectPath(f"{self.kind}://{self.key}/{part}")

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(f"{self.kind}://{posixpath.dirname(self.key) or self.bucket}")

    @property
    def fs(self) -> pafs.FileSystem:
        return _filesystem(self.kind, self.bucket)

    # ------------------------------------------------------------------------------------------ queries
    def _info(self):
        return self.fs.get_file_info(self.key)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def size(self) -> int:
        return self._info().size

    def mtime(self) -> float:
        """When the object was last written (seconds since the epoch)."""
        return self._info().mtime.timestamp()

    def iterdir(self) -> list[ObjectPath]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.key, allow_not_found=True))
        return [ObjectPath(f"{self.kind}://{info.path}") for info in infos]

    def glob(self, pattern: str) -> list[ObjectPath]:
        """The direct children whose name matches ``pattern`` (no ``**``)."""
        if "/" in pattern:
            raise ValueError(f"ObjectPath.glob takes a name pattern, not {pattern!r}")
        return [p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern)]

    # ---------------------------------------------------------------------------------- reads and writes
    def open_input(self):
        return self.fs.open_input_file(self.key)

    def read_bytes(self) -> bytes:
        with self.open_input() as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open_output(self):
        """A stream whose object appears, whole, when the stream closes without error."""
        return self.fs.open_output_stream(self.key)

    def write_bytes(self, data: bytes) -> int:
        with self.open_output() as f:
            f.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a prefix exists once an object has it."""

    def rmtree(self) -> None:
        self.fs.delete_dir_contents(self.key, missing_dir_ok=True)

    def download(self, dest: Path) -> Path:
        """Copy this object to ``dest`` on this machine, atomically (a temporary name, then a rename)."""
        with atomic.atomic_path(dest) as tmp, self.open_input() as src, open(tmp, "wb") as out:
            while chunk := src.read(8 << 20):
                out.write(chunk)
        return Path(dest)

    def upload(self, src: Path) -> ObjectPath:
        """Copy the local file ``src`` to this object."""
        with open(src, "rb") as f, self.open_output() as out:
            while chunk := f.read(8 << 20):
                out.write(chunk)
        return self


def mtime(path: Path | ObjectPath) -> float:
    """When ``path`` was last written (seconds since the epoch)."""
    return path.mtime() if isinstance(path, ObjectPath) else path.stat().st_mtime


# ------------------------------------------------------------------------------------- one way to write


def write_bytes(path: Path | ObjectPath, data: bytes) -> None:
    """Write ``data`` atomically: a reader sees the old file or the new one (see the module's docstring)."""
    if isinstance(path, ObjectPath):
        path.write_bytes(data)
    else:
        atomic.write_bytes(path, data)


def write_text(path: Path | ObjectPath, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def append_text(path: Path | ObjectPath, text: str) -> None:
    """Append ``text`` to a log: in place on a disk; an object store has no append, so the object is rewritten
    (logs written here are a few kilobytes, once per trial attempt)."""
    if isinstance(path, ObjectPath):
        path.write_text((path.read_text() if path.exists() else "") + text)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(text)


def cache_dir(*parts: str) -> Path:
    """This machine's cache for copies of remote files (``$SSL_STUDY_CACHE``, default ``~/.cache/ssl-study``)."""
    root = Path(os.environ.get("SSL_STUDY_CACHE") or Path.home() / ".cache" / "ssl-study")
    return root.joinpath(*parts)


def local_copy_dir(remote: ObjectPath, *, kind: str) -> Path:
    """The folder on this machine that mirrors ``remote``: ``cache_dir()/kind/<scheme>/<bucket>/<key>``."""
    return cache_dir(kind, remote.kind, *remote.key.split("/"))


def on_this_machine(where: Path | ObjectPath, *, kind: str) -> Path:
    """The folder on this machine for what ``where`` holds: ``where`` itself, or its :func:`local_copy_dir`."""
    return local_copy_dir(where, kind=kind) if isinstance(where, ObjectPath) else where


def check_writable(where: Path | ObjectPath, setting: str) -> str | None:
    """Why ``where`` cannot hold a study's files (one line naming ``setting``: an unreachable endpoint, a missing
    bucket, refused credentials), or None. Writes and removes one small object; a local path is not checked here."""
    if not isinstance(where, ObjectPath):
        return None
    import pyarrow.fs as pafs

    probe_fs = where.fs
    if where.kind == "s3":  # the same endpoint and credentials as Ray's, with a short timeout and no retries
        options = {k: v for k, v in where.fs.__reduce__()[1][0].items() if v not in (None, "")}
        options.update(connect_timeout=CHECK_TIMEOUT_S, request_timeout=CHECK_TIMEOUT_S)
        probe_fs = pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    probe = f"{where.key}/.ssl-study-write-check.{os.getpid()}"
    try:
        with probe_fs.open_output_stream(probe) as f:
            f.write(b"ok")
        probe_fs.delete_file(probe)
    except OSError as e:
        return problem(where, setting, e, "cannot write there")
    return None


def problem(where: Path | ObjectPath, setting: str, error: OSError, what: str = "cannot read it") -> str:
    """One line for an object store's error at ``where``: what to fix (a missing bucket, refused credentials, an
    unreachable endpoint), then the SDK's own reason, cut short."""
    reason = " ".join(str(error).split())
    squashed = reason.upper().replace("_", "")
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the provider's default endpoint")
    bucket = getattr(where, "bucket", "")
    if "NOSUCHBUCKET" in squashed or "BUCKET DOES NOT EXIST" in squashed:
        hint = f"bucket {bucket!r} does not exist: create it first"
    elif any(w in squashed for w in ("ACCESSDENIED", "INVALIDACCESSKEYID", "SIGNATUREDOESNOTMATCH",
                                     "INVALIDCLIENTTOKENID")):
        hint = ("the credentials were refused: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the instance role) in "
                "this process's environment")
    elif "NETWORKCONNECTION" in squashed or "CONNECT" in squashed:
        hint = f"cannot reach {endpoint} (AWS_ENDPOINT_URL for an S3-compatible server)"
    else:
        hint = f"endpoint {endpoint}"
    return f"{setting}: {where}: {what} ({hint}; {reason[:200]})"
