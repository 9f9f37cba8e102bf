"""The files of the results tables: the one reader (:func:`read`: a table's compacted file and parts as one
table), the part files' names, the merge of parts (:func:`combine`) and the atomic writer (:func:`write_atomic`).
The layout, the part numbering and the replacement of a restarted trial's epochs are described in
``study/results/__init__.py``."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.atomic import atomic_path
from data.store import ObjectPath, location
from study.results.schema import APPENDED, UNIQUE, upgraded

THROUGH = b"ssl_study.through"  # a compacted file's metadata: the last part sequence number it holds
PART = re.compile(r"^(epochs|events)-part-(\d+)-(\d+)\.parquet$")


def write_atomic(table: pa.Table, path: Path | ObjectPath) -> Path | ObjectPath:
    """Write ``table`` to ``path`` atomically: a reader sees the old table or the new one (a temporary file renamed
    on a disk, data/atomic.py; one upload to object storage, where an object appears whole: data/store.py)."""
    if isinstance(path, ObjectPath):
        with path.open_output() as f:
            pq.write_table(table, f)
        return path
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path



def part_name(table: str, lo: int, hi: int) -> str:
    return f"{table}-part-{lo:08d}-{hi:08d}.parquet"


def parts(folder: Path | ObjectPath, table: str) -> list[tuple[int, int, Path]]:
    """The part files of ``table`` in ``folder`` as (first, last sequence number, path), oldest first. A part
    inside the range of another is left out: a merge wrote the merged part and has not removed its sources."""
    found = []
    for path in location(folder).glob(f"{table}-part-*.parquet"):
        m = PART.match(path.name)
        if m and m.group(1) == table:
            found.append((int(m.group(2)), int(m.group(3)), path))
    found.sort(key=lambda p: (p[0], -p[1]))
    out: list[tuple[int, int, Path]] = []
    for lo, hi, path in found:
        if not out or hi > out[-1][1]:
            out.append((lo, hi, path))
    return out


def through(table: pa.Table) -> int:
    """The last part sequence number a compacted file holds (0: none, or a file of another writer)."""
    return int((table.schema.metadata or {}).get(THROUGH, b"0"))


class _Vanished(Exception):
    """A file listed a moment ago is gone: a merge or a compaction removed it; the read starts again."""


def read_file(path: str | Path | ObjectPath) -> pa.Table:
    """One Parquet file, read through one open handle: ``pq.read_table(path)`` opens the path twice (its schema,
    then its data), and a file replaced in between (trials.parquet, rewritten while the study runs) reads torn."""
    path = location(path)
    with path.open_input() if isinstance(path, ObjectPath) else pa.OSFile(str(path)) as f:
        return upgraded(pq.read_table(f))


def _read(path: Path) -> pa.Table:
    try:
        return read_file(path)
    except FileNotFoundError:
        raise _Vanished(path) from None


def _codes(*columns: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """Each of ``columns`` (trial ids) as integer codes, one code per distinct id across all of them."""
    chunks = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns]
    values = pc.unique(pa.concat_arrays([c.cast(pa.string()) for c in chunks]))
    return [pc.index_in(c.cast(pa.string()), value_set=values).to_numpy(zero_copy_only=False).astype(np.int64)
            for c in chunks]


def _epochs_of(table: pa.Table, missing: int) -> np.ndarray:
    return pc.fill_null(table.column("epoch"), missing).to_numpy().astype(np.int64)


def _superseded(pieces: list[tuple[int, int, pa.Table]], marks: list[tuple[int, int, pa.Table]]) -> np.ndarray:
    """Which rows of ``pieces`` (files as (first, last sequence number, table), concatenated) a later report
    replaces: a row of trial T and epoch e in a file ending at sequence h, when an epochs file starting after h
    (``marks``) has a row of T with an epoch <= e (a restarted trial reported that epoch again)."""
    marks = [m for m in marks if m[2].num_rows]
    n = sum(t.num_rows for _, _, t in pieces)
    if not marks or not n:
        return np.zeros(n, dtype=bool)
    q_ids = pa.chunked_array([t.column("trial_id") for _, _, t in pieces], type=pa.string())
    m_ids = pa.chunked_array([t.column("trial_id") for _, _, t in marks], type=pa.string())
    t_q, t_m = _codes(q_ids, m_ids)
    h_q = np.concatenate([np.full(t.num_rows, hi, dtype=np.int64) for _, hi, t in pieces])
    e_q = np.concatenate([_epochs_of(t, np.iinfo(np.int64).min) for _, _, t in pieces])  # no epoch: kept
    lo_m = np.concatenate([np.full(t.num_rows, lo, dtype=np.int64) for lo, _, t in marks])
    e_m = np.concatenate([_epochs_of(t, -1) for _, _, t in marks])
    valid = np.concatenate([t.column("epoch").is_valid().to_numpy(zero_copy_only=False) for _, _, t in marks])
    if not valid.all():
        t_m, lo_m, e_m = t_m[valid], lo_m[valid], e_m[valid]
    if not len(e_m):
        return np.zeros(n, dtype=bool)
    span = int(max(lo_m.max(), h_q.max())) + 2
    keys = t_m * span + (span - 1 - lo_m)  # by trial, then by sequence number, latest first
    order = np.argsort(keys, kind="stable")
    keys, e_m, t_m = keys[order], e_m[order], t_m[order]
    # the smallest epoch of each trial's marks from the latest file down to each one: a running minimum within
    # each trial, by an offset that keeps a trial's values above those of every later trial
    step = int(e_m.max() - e_m.min()) + 1
    running = np.minimum.accumulate(e_m - t_m * step) + t_m * step
    pos = np.searchsorted(keys, t_q * span + (span - 1 - h_q), side="left") - 1
    later = (pos >= 0) & (keys[np.maximum(pos, 0)] >= t_q * span)  # a mark of the same trial, in a later file
    return later & (e_q >= running[np.maximum(pos, 0)])


def _last_of(table: pa.Table, keys: list[str]) -> pa.Table:
    """``table`` with one row per ``keys``: the last one."""
    if not table.num_rows:
        return table
    index = table.select(keys).append_column("_row", pa.array(np.arange(table.num_rows)))
    keep = np.sort(index.group_by(keys, use_threads=False).aggregate([("_row", "max")])["_row_max"].to_numpy())
    return table if len(keep) == table.num_rows else table.take(keep)


def combine(table: str, pieces: list[tuple[int, int, pa.Table]],
            marks: list[tuple[int, int, pa.Table]] | None = None) -> pa.Table:
    """The files ``pieces`` of ``table`` (as (first, last sequence number, table), oldest first) as one table:
    rows a later report replaced left out, one row per epoch (per event) of a trial, the latest. ``marks``: the
    epochs files the replacements come from (for ``epochs``, the pieces themselves)."""
    if len(pieces) == 1:
        return pieces[0][2]
    marks = pieces if marks is None else marks
    stale = _superseded(pieces, marks)
    out = pa.concat_tables([t.replace_schema_metadata(None) for _, _, t in pieces], promote_options="permissive")
    if stale.any():
        out = out.filter(pa.array(~stale))
    return _last_of(out, UNIQUE[table])


def _read_once(folder: Path, table: str) -> pa.Table:
    base = folder / f"{table}.parquet"
    if table not in APPENDED:
        return read_file(base)
    epoch_parts = parts(folder, "epochs")  # listed first: see the events bound below
    own = epoch_parts if table == "epochs" else parts(folder, table)
    if not base.exists() and not own:
        raise FileNotFoundError(f"{base}: no such table")
    first = _read(base) if base.exists() else None
    done = through(first) if first is not None else 0
    # events: no part newer than the epochs parts listed, so that the reports replacing rows are all there
    newest = max([hi for _, hi, _ in epoch_parts], default=done)
    pieces = [(0, done, first)] if first is not None else []
    pieces += [(lo, hi, _read(p)) for lo, hi, p in own if lo > done and (table == "epochs" or hi <= newest)]
    if len(pieces) == 1:
        return pieces[0][2]
    if table == "epochs":
        marks = [p for p in pieces if p[0] > done]
    else:
        marks = [(lo, hi, _read(p).select(["trial_id", "epoch"])) for lo, hi, p in epoch_parts
                 if lo > done and hi <= newest]
    meta = (first if first is not None else pieces[-1][2]).schema.metadata or {}
    return combine(table, pieces, marks).replace_schema_metadata({k: v for k, v in meta.items() if k != THROUGH})


def read(folder: str | Path | ObjectPath, table: str = "trials", attempts: int = 50) -> pa.Table:
    """``table`` of the results folder ``folder`` (``<study_dir>/results``, or a record's folder of tables; a path
    or an object-storage URI), its compacted file and its parts read as one table, deduplicated, also while the
    study writes it. FileNotFoundError when it has none of them."""
    folder = location(folder)
    for attempt in range(attempts):
        try:
            return _read_once(folder, table)
        except _Vanished:  # a merge or a compaction replaced files between listing and reading: list again
            if attempt == attempts - 1:
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")
