"""The one way this project writes a file: under a temporary name next to it, fsync, then rename over it.

A reader sees the old file or the new one, never a partial one, and a crash leaves the old file in place.
The temporary name is ``.NAME.HOST.PID.RANDOM.tmp`` (hidden, so no ``*.beton`` / ``*.parquet`` glob matches it);
a writer killed with -9 cannot remove its own, so :func:`sweep_stale` removes those whose process is gone
(on this host) or that are a day old (another host: its PIDs cannot be checked from here).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

STALE_AFTER_S = 24 * 3600  # a temporary file of another host this old belongs to no live writer
_HOST = socket.gethostname().replace(".", "-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def sweep_stale(path: Path) -> list[Path]:
    """Remove the temporary files that dead writers left next to ``path``; returns the removed paths."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2:].split(".")
        if len(parts) == 4 and parts[1].isdigit():  # .NAME.HOST.PID.RANDOM.tmp
            host, pid = parts[0], int(parts[1])
        elif len(parts) == 2 and parts[0].isdigit():  # .NAME.PID.tmp of the writers before this module
            host, pid = _HOST, int(parts[0])
        else:
            host, pid = None, None
        try:
            stale = (not _pid_alive(pid) if host == _HOST else time.time() - tmp.stat().st_mtime > STALE_AFTER_S)
            if stale:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # another sweeper was first
            continue
    return removed


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for the caller to write; on success it is fsynced and renamed
    onto ``path``, on any error (or interrupt) removed. Stale temporary files of ``path`` are swept first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
