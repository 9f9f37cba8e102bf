"""The terminal of a running study: ssl-study's own lines go to it (:func:`out`, :func:`err`, :func:`say`) while
:func:`console` sends everything else written to it (Ray's, Tune's and the workers' output) to a log file; and the
tables the CLI prints (:func:`format_table`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import pyarrow as pa

_terminal: list[tuple[TextIO, TextIO]] = []  # the terminal's stdout and stderr while console() redirects them


def out() -> TextIO:
    return _terminal[-1][0] if _terminal else sys.stdout


def err() -> TextIO:
    return _terminal[-1][1] if _terminal else sys.stderr


@contextmanager
def console(log: Path | None) -> Iterator[None]:
    """Inside the block, whatever is written to file descriptors 1 and 2 is appended to ``log``: Ray's, Tune's
    and Optuna's prints and log records, the C++ core's messages, the workers' output that Ray forwards to the
    driver, and the output of the processes Ray starts meanwhile. Redirecting the descriptors, not
    ``sys.stdout``, is what catches all of them: logging handlers hold the original streams and the C++ code
    writes to the descriptors. ``out()`` and ``err()`` keep writing to the terminal. ``None``: redirect nothing."""
    if log is None:
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = (os.fdopen(os.dup(1), "w", buffering=1), os.fdopen(os.dup(2), "w", buffering=1))
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    _terminal.append(terminal)
    colour = os.environ.get("RAY_COLOR_PREFIX")
    os.environ["RAY_COLOR_PREFIX"] = "0"  # the driver prints the workers' lines without colour codes, as a file wants
    try:
        yield
    finally:
        sys.stdout.flush()  # what Python still buffers belongs to the log, not to the terminal
        sys.stderr.flush()
        _terminal.pop()
        for fd, stream in enumerate(terminal, start=1):
            os.dup2(stream.fileno(), fd)
            stream.close()
        if colour is None:
            os.environ.pop("RAY_COLOR_PREFIX")
        else:
            os.environ["RAY_COLOR_PREFIX"] = colour


def say(line: str) -> None:
    print(line, file=out(), flush=True)


def format_table(table: pa.Table, columns: list[str] | None = None) -> str:
    """A plain-text table for the terminal, floats to 4 significant digits."""
    columns = [c for c in (columns or table.column_names) if c in table.column_names]

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    rows = [[cell(v) for v in row.values()] for row in table.select(columns).to_pylist()]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(columns), *(line(r) for r in rows)])
