"""A study's results as Parquet tables, written while the study runs.

Under ``<storage>/<name>/results/``, with schema version :data:`SCHEMA_VERSION` in each file's metadata:

- ``trials.parquet``: one row per trial: ``study``, ``trial_id``, every searched parameter as its own typed
  column, ``status`` (study/status.py), epochs done, final / best / at-init kNN top-1, final loss, the
  instability verdict (also in observe mode: ``verdict`` and ``verdict_epoch`` say when the policy would have
  stopped it) and totals of the signals, wall time, resources, checkpoint path, error.
- ``epochs``: one row per trial per reported epoch: every metric of ``EPOCH_METRICS``.
- ``events``: one row per instability event (trainers/signals.py): step, epoch, kind, layer, magnitude.

The layout keeps the cost of a reported epoch flat however large the study grows (issue 15 §5):

- ``trials.parquet`` is one file, small (a row per trial), rewritten whole from the rows the writer keeps (as
  columns), at most once per :attr:`ResultsWriter.trials_every_s` while trials report, and at once when a trial
  ends or fails and when the experiment ends.
- ``epochs`` and ``events`` are append-only: ``epochs.parquet`` (the compacted table) plus part files
  ``epochs-part-LO-HI.parquet`` (and the same for ``events``). New rows are buffered and written as one part per
  flush, numbered by a sequence that never goes back (LO == HI for a fresh part). A flush happens once the
  oldest buffered row is :attr:`ResultsWriter.flush_every_s` old or :attr:`ResultsWriter.part_rows` rows are
  buffered, and at once when a result comes with a checkpoint (its rows and all before), when a trial ends or
  fails and when the experiment ends. Every :attr:`ResultsWriter.merge_parts`
  parts of one size class are merged into one part covering their sequence numbers (a part of
  :attr:`ResultsWriter.chunk_rows` rows or more is merged no more), so the files stay few and each row is
  rewritten a bounded number of times. When the experiment ends (and when a
  writer starts on a study that has parts, e.g. after a crash) everything is compacted into ``epochs.parquet`` /
  ``events.parquet`` (file metadata ``ssl_study.through``: the last sequence number folded in) and the parts are
  removed: a finished study has the three files of old.

Every file is written to a temporary name then renamed (data/atomic.py), or uploaded whole to object storage
(data/store.py), so a reader never sees a partial file. A killed driver loses at most the rows still buffered,
none of them at or before a trial's checkpoint: those are written when the checkpoint's result comes (a trial
restored from its checkpoint goes on with the epoch after it; its re-report of the checkpointed epoch does not
reach Tune on Ray 2.60, seen in tests/test_object_storage.py). A restored trial's reports replace its rows of
that epoch and later (epochs and events), in the writer's buffer, at a merge and at a compaction, and in
:func:`read_table`, which reads the compacted file and the parts as one table (the later of two reports wins).

Read the tables with :func:`read_table` / :func:`open` while a study runs. ``pq.read_table(".../epochs.parquet")``
or DuckDB's ``read_parquet('.../results/epochs*.parquet')`` read the files as they are: the same table once the
study ended; while it runs, the compacted file only, or parts that may still hold a replaced epoch. A file
replaced while ``pq.read_table(path)`` reads it can read torn (pyarrow opens the path twice): :func:`read_file`
opens it once. The writer reloads the tables it finds, so a resumed study appends to them.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.tune import Callback

from data.atomic import atomic_path
from data.store import ObjectPath, location
from search_spaces import Param
from study.best import number
from study.spec import StudySpec
from study.status import failure, trial_status
from trainers.events import SUMMARY_KEYS

SCHEMA_VERSION = 2  # 2: rankme and epoch_time_s
TABLES = ("trials", "epochs", "events")
APPENDED = ("epochs", "events")  # the tables kept as a compacted file plus parts
THROUGH = b"ssl_study.through"  # a compacted file's metadata: the last part sequence number it holds

EPOCH_METRICS = ("epoch", "loss", "lr", "moco_m", "knn_top1", "knn_top1_k200", "knn_top1_init", "rankme",
                 "dense_knn_last", "dense_knn_min", "online_probe_top1", "images_per_s", "step_time_s",
                 "epoch_time_s", *SUMMARY_KEYS)
_KEY = [("study", pa.string()), ("trial_id", pa.string())]
EPOCHS_SCHEMA = pa.schema([*_KEY, ("epoch", pa.int64()),
                           *[(m, pa.float64()) for m in EPOCH_METRICS if m != "epoch"],
                           ("verdict", pa.string()), ("verdict_reason", pa.string()), ("stopped", pa.int64())])
EVENTS_SCHEMA = pa.schema([*_KEY, ("step", pa.int64()), ("epoch", pa.int64()), ("kind", pa.string()),
                           ("layer", pa.string()), ("magnitude", pa.float64())])
_UNIQUE = {"epochs": ["trial_id", "epoch"], "events": ["trial_id", "step", "kind", "layer"]}  # last one wins
_TRIAL_COLUMNS = [
    ("status", pa.string()), ("epochs_done", pa.int64()), ("knn_top1", pa.float64()),
    ("knn_top1_best", pa.float64()), ("knn_top1_init", pa.float64()), ("rankme", pa.float64()),
    ("loss", pa.float64()),
    ("verdict", pa.string()), ("verdict_reason", pa.string()), ("verdict_epoch", pa.int64()),
    ("spike_episodes", pa.float64()), ("knn_dips", pa.float64()), ("max_spike_ratio", pa.float64()),
    ("events", pa.int64()), ("time_total_s", pa.float64()), ("workers", pa.int64()),
    ("cpus_per_worker", pa.float64()), ("gpus_per_worker", pa.float64()), ("checkpoint", pa.string()),
    ("error", pa.string()),
]
_PART = re.compile(r"^(epochs|events)-part-(\d+)-(\d+)\.parquet$")


def _param_type(param: Param) -> pa.DataType:
    if param.kind in ("log", "uniform"):
        return pa.float64()
    if param.kind == "int":
        return pa.int64()
    return pa.array(list(param.args)).type  # choice: the type of its values


def trials_schema(params: list[Param]) -> pa.Schema:
    return pa.schema([*_KEY, *[(p.name, _param_type(p)) for p in params], *_TRIAL_COLUMNS])


def _with_version(schema: pa.Schema, table: str) -> pa.Schema:
    return schema.with_metadata({"ssl_study.schema_version": str(SCHEMA_VERSION), "ssl_study.table": table})


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


def _finite_max(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else math.nan


# --------------------------------------------------------------------------------------------- reading


def part_name(table: str, lo: int, hi: int) -> str:
    return f"{table}-part-{lo:08d}-{hi:08d}.parquet"


def parts(folder: Path | ObjectPath, table: str) -> list[tuple[int, int, Path]]:
    """The part files of ``table`` in ``folder`` as (first, last sequence number, path), oldest first. A part
    inside the range of another is left out: a merge wrote the merged part and has not removed its sources."""
    found = []
    for path in location(folder).glob(f"{table}-part-*.parquet"):
        m = _PART.match(path.name)
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
        return pq.read_table(f)


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
    return _last_of(out, _UNIQUE[table])


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


def read_folder(folder: str | Path | ObjectPath, table: str = "trials", attempts: int = 50) -> pa.Table:
    """``table`` of the results folder ``folder`` (``<study_dir>/results``, or a record's folder of tables; a path
    or an object-storage URI), its compacted file and its parts read as one table. FileNotFoundError when it has
    none of them."""
    folder = location(folder)
    for attempt in range(attempts):
        try:
            return _read_once(folder, table)
        except _Vanished:  # a merge or a compaction replaced files between listing and reading: list again
            if attempt == attempts - 1:
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


def read_table(study_dir: str | Path, table: str = "trials") -> pa.Table:
    """``table`` (``trials``, ``epochs`` or ``events``) of the study in ``study_dir``, whole and deduplicated,
    also while the study runs; FileNotFoundError when it has not been written yet."""
    return read_folder(location(study_dir) / "results", table)


def read(study_dir: Path | ObjectPath, table: str = "trials") -> pa.Table:
    return read_table(study_dir, table)


# --------------------------------------------------------------------------------------------- writing


@dataclass(slots=True)
class _Epoch:
    """What a trial's row needs of one of its epochs."""

    epoch: int
    knn_top1: float
    knn_top1_init: float
    rankme: float
    loss: float
    verdict: str | None
    verdict_reason: str | None
    spike_episodes: float
    knn_dips: float
    max_spike_ratio: float
    stopped: int


class _History:
    """A trial's epochs so far (ascending) and the totals its row shows, kept up to date one epoch at a time."""

    __slots__ = ("best", "dips", "epochs", "events", "flagged", "ratio", "spikes")

    def __init__(self) -> None:
        self.epochs: list[_Epoch] = []
        self.events: dict[tuple, int] = {}  # (step, kind, layer) -> epoch
        self._reset()

    def _reset(self) -> None:
        self.best = self.ratio = math.nan
        self.spikes = self.dips = 0.0
        self.flagged: _Epoch | None = None

    def add(self, e: _Epoch) -> None:
        self.epochs.append(e)
        if math.isfinite(e.knn_top1) and not e.knn_top1 <= self.best:
            self.best = e.knn_top1
        if math.isfinite(e.max_spike_ratio) and not e.max_spike_ratio <= self.ratio:
            self.ratio = e.max_spike_ratio
        self.spikes += e.spike_episodes if math.isfinite(e.spike_episodes) else 0.0
        self.dips += e.knn_dips if math.isfinite(e.knn_dips) else 0.0
        if self.flagged is None and e.verdict:
            self.flagged = e

    def truncate(self, epoch: int) -> None:
        """Forget epoch ``epoch`` and later (a restarted trial reports them again)."""
        kept = [e for e in self.epochs if e.epoch < epoch]
        self.epochs, self.events = [], {k: v for k, v in self.events.items() if v < epoch}
        self._reset()
        for e in kept:
            self.add(e)


@dataclass
class _Part:
    """A part file pair written by this writer and not yet compacted; the tables are kept while it may merge."""

    lo: int
    hi: int
    level: int  # 0: a flush; n + 1: a merge of parts of level n; CLOSED: big enough, merged no more
    epochs: pa.Table | None
    events: pa.Table | None


CLOSED = 1 << 30


class ResultsWriter(Callback):
    """Tune callback that keeps the ``trials``, ``epochs`` and ``events`` tables up to date (see the module)."""

    flush_every_s = 2.0  # buffered epoch and event rows are written as a part at most this late
    part_rows = 5_000  # ... or once this many are buffered
    trials_every_s = 1.0  # trials.parquet is rewritten at most this often while trials only report epochs
    merge_parts = 8  # this many parts of one size class merge into one
    chunk_rows = 50_000  # a part of this many epoch rows is merged no more (until the compaction at the end)

    def __init__(self, spec: StudySpec, *, clock=time.monotonic, **settings) -> None:
        self.study, self.out, self.logs = spec.name, spec.study_dir / "results", spec.study_dir / "logs"
        # Ray names a checkpoint in object storage by its path in the bucket: the table gives the whole URI
        self.scheme = f"{self.out.kind}://" if isinstance(self.out, ObjectPath) else ""
        self.params, self.epochs = spec.params, spec.train_config().epochs
        self.resources = spec.resources
        self.schemas = {"trials": _with_version(trials_schema(self.params), "trials"),
                        "epochs": _with_version(EPOCHS_SCHEMA, "epochs"),
                        "events": _with_version(EVENTS_SCHEMA, "events")}
        for key, value in settings.items():  # flush_every_s, part_rows, trials_every_s, merge_parts, chunk_rows
            if not hasattr(type(self), key):
                raise TypeError(f"ResultsWriter: unknown setting {key!r}")
            setattr(self, key, value)
        self.clock = clock
        # what was written: rows and files per table, merges, compactions, files read back (only when starting)
        self.stats = {"rows": dict.fromkeys(TABLES, 0), "files": dict.fromkeys(TABLES, 0), "merges": 0,
                      "compactions": 0, "files_read": 0}
        self._loaded = False  # the state below is loaded on first use, after unpickling

    _STATE = ("trial_pos", "trial_cols", "history", "buffer", "buffered_since", "open_parts",
              "trials_dirty", "trials_written", "seq")

    def __getstate__(self) -> dict:  # Tune pickles callbacks with its experiment: the state is reloaded from files
        return {**{k: v for k, v in self.__dict__.items() if k not in self._STATE}, "_loaded": False}

    # ------------------------------------------------------------------------------------------ the state

    def _load(self) -> None:
        """Load the tables already written (a resumed study): compact what a killed driver left in parts, keep
        each trial's row and what its totals need, and go on numbering parts after the last one."""
        if self._loaded:
            return
        # the trials table as columns (one list per column, a row per trial): rewriting it converts lists
        self.trial_pos: dict[str, int] = {}
        self.trial_cols: dict[str, list] = {name: [] for name in self.schemas["trials"].names}
        self.history: dict[str, _History] = {}
        self.buffer: dict[str, list[dict]] = {"epochs": [], "events": []}
        self.buffered_since: float | None = None
        self.open_parts: list[_Part] = []
        self.trials_dirty, self.trials_written = False, -math.inf
        self.out.mkdir(parents=True, exist_ok=True)
        tables = {}
        for name in TABLES:
            try:
                tables[name] = read_folder(self.out, name)
                self.stats["files_read"] += 1 + (len(parts(self.out, name)) if name in APPENDED else 0)
            except FileNotFoundError:
                tables[name] = None
        bases = [through(t) for n, t in tables.items() if n in APPENDED and t is not None]
        self.seq = max([*bases, *(hi for n in APPENDED for _, hi, _ in parts(self.out, n)), 0]) + 1
        self._loaded = True
        for row in tables["trials"].to_pylist() if tables["trials"] is not None else []:
            self._set_trial(row)
        epochs = tables["epochs"]
        if epochs is not None and epochs.num_rows:
            columns = ["trial_id", "epoch", "knn_top1", "knn_top1_init", "rankme", "loss", "verdict",
                       "verdict_reason", "spike_episodes", "knn_dip_count", "max_spike_ratio", "stopped"]
            cols = {c: epochs.column(c).to_pylist() if c in epochs.column_names else [None] * epochs.num_rows
                    for c in columns}  # a table of an older schema version may lack some
            for i in sorted(range(epochs.num_rows), key=lambda i: (cols["trial_id"][i], cols["epoch"][i])):
                self._history(cols["trial_id"][i]).add(_Epoch(
                    cols["epoch"][i], *(number(cols[c][i]) for c in columns[2:6]), cols["verdict"][i],
                    cols["verdict_reason"][i], *(number(cols[c][i]) for c in columns[8:11]),
                    int(cols["stopped"][i] or 0)))
        events = tables["events"]
        if events is not None and events.num_rows:
            for e in events.select(["trial_id", "step", "kind", "layer", "epoch"]).to_pylist():
                self._history(e["trial_id"]).events[(e["step"], e["kind"], e["layer"])] = e["epoch"]
        if any(parts(self.out, n) for n in APPENDED) or any(tables[n] is None for n in APPENDED):
            self._compact(tables)

    def _history(self, trial_id: str) -> _History:
        h = self.history.get(trial_id)
        if h is None:
            h = self.history[trial_id] = _History()
        return h

    # ------------------------------------------------------------------------------------------ the files

    def _write(self, name: str, table: pa.Table, filename: str, done: int | None = None) -> None:
        meta = dict(self.schemas[name].metadata)
        if done is not None:
            meta[THROUGH] = str(done).encode()
        write_atomic(table.replace_schema_metadata(meta), self.out / filename)
        self.stats["rows"][name] += table.num_rows
        self.stats["files"][name] += 1

    def _flush_rows(self) -> None:
        """Write the buffered epoch and event rows as a new part, and merge parts as they come in."""
        if not self.buffer["epochs"] and not self.buffer["events"]:
            return
        seq, self.seq = self.seq, self.seq + 1
        tables = {name: pa.Table.from_pylist(rows, schema=self.schemas[name]) for name, rows in self.buffer.items()}
        for name in ("events", "epochs"):  # events first: a reader lists the epochs parts before the events parts
            if tables[name].num_rows:
                self._write(name, tables[name], part_name(name, seq, seq))
        self.buffer, self.buffered_since = {"epochs": [], "events": []}, None
        self.open_parts.append(_Part(seq, seq, 0, tables["epochs"], tables["events"]))
        self._merge()

    def _merge(self) -> None:
        """While the last ``merge_parts`` parts are of one level, merge them into one part of the next."""
        while len(self.open_parts) >= self.merge_parts:
            group = self.open_parts[-self.merge_parts:]
            level = group[-1].level
            if level == CLOSED or any(p.level != level for p in group):
                return
            lo, hi = group[0].lo, group[-1].hi
            pieces = {name: [(p.lo, p.hi, getattr(p, name)) for p in group] for name in APPENDED}
            epochs = combine("epochs", pieces["epochs"])
            events = combine("events", pieces["events"], pieces["epochs"])
            for name, table in (("events", events), ("epochs", epochs)):
                if table.num_rows:
                    self._write(name, table, part_name(name, lo, hi))
            for p in group:  # the merged part holds them: remove them (readers that listed them read again)
                for name in APPENDED:
                    (self.out / part_name(name, p.lo, p.hi)).unlink(missing_ok=True)
            self.stats["merges"] += 1
            closed = epochs.num_rows >= self.chunk_rows
            self.open_parts[-self.merge_parts:] = [_Part(lo, hi, CLOSED if closed else level + 1,
                                                         None if closed else epochs, None if closed else events)]

    def _compact(self, tables: dict[str, pa.Table | None] | None = None) -> None:
        """Fold every part into ``epochs.parquet`` / ``events.parquet`` and remove the parts."""
        listed = {name: parts(self.out, name) for name in APPENDED}
        if tables is None and not any(listed.values()) and all((self.out / f"{n}.parquet").exists() for n in APPENDED):
            self.open_parts = []
            return  # nothing to fold in
        if tables is None:
            tables = {}
            for name in APPENDED:
                tables[name] = read_folder(self.out, name) if (self.out / f"{name}.parquet").exists() or \
                    listed[name] else None
                self.stats["files_read"] += 1 + len(listed[name])
        done = self.seq - 1
        for name in ("events", "epochs"):
            table = tables.get(name)
            self._write(name, table if table is not None else self.schemas[name].empty_table(), f"{name}.parquet",
                        done)
        for name in APPENDED:  # every part they hold, the sources of a merge left behind by a crash too
            for path in self.out.glob(f"{name}-part-*.parquet"):
                m = _PART.match(path.name)
                if m and int(m.group(3)) <= done:
                    path.unlink(missing_ok=True)
        self.open_parts = []
        self.stats["compactions"] += 1

    def _write_trials(self) -> None:
        schema = self.schemas["trials"]
        table = pa.Table.from_arrays([pa.array(self.trial_cols[f.name], type=f.type) for f in schema], schema=schema)
        self._write("trials", table, "trials.parquet")
        self.trials_dirty, self.trials_written = False, self.clock()

    def _maybe_flush(self, now: bool = False) -> None:
        """Write what is due: everything with ``now`` (a trial ended), else what the throttles allow."""
        t = self.clock()
        rows = len(self.buffer["epochs"]) + len(self.buffer["events"])
        if rows and (now or rows >= self.part_rows or t - self.buffered_since >= self.flush_every_s):
            self._flush_rows()
        if self.trials_dirty and (now or t - self.trials_written >= self.trials_every_s):
            self._write_trials()

    def flush(self) -> None:
        """Write everything buffered now: a part of the new epoch and event rows, and the trials table."""
        self._load()
        self._flush_rows()
        if self.trials_dirty or not (self.out / "trials.parquet").exists():
            self._write_trials()

    def compact(self) -> None:
        """:meth:`flush`, then fold every part into the compacted files."""
        self.flush()
        self._compact()

    # ------------------------------------------------------------------------------------------ Tune hooks

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._load()
        tid, epoch = trial.trial_id, int(result.get("epoch", 0))
        h = self._history(tid)
        if h.epochs and epoch <= h.epochs[-1].epoch:
            # A trial restarted from a checkpoint reports its later epochs again: they replace the old rows
            # (here and in the buffer; read_table, merges and compactions leave out those in older files).
            h.truncate(epoch)
            for name in APPENDED:
                self.buffer[name] = [r for r in self.buffer[name] if r["trial_id"] != tid or r["epoch"] < epoch]
        row = {"study": self.study, "trial_id": tid, **{m: number(result.get(m)) for m in EPOCH_METRICS},
               "epoch": epoch, "verdict": result.get("verdict") or None,
               "verdict_reason": result.get("verdict_reason") or None, "stopped": int(result.get("stopped", 0))}
        if self.buffered_since is None:
            self.buffered_since = self.clock()
        self.buffer["epochs"].append(row)
        h.add(_Epoch(epoch, row["knn_top1"], row["knn_top1_init"], row["rankme"], row["loss"], row["verdict"],
                     row["verdict_reason"], row["spike_episodes"], row["knn_dip_count"], row["max_spike_ratio"],
                     row["stopped"]))
        for event in result.get("events") or []:
            event = {"study": self.study, "trial_id": tid, **event, "magnitude": number(event.get("magnitude"))}
            self.buffer["events"].append(event)
            h.events[(event.get("step"), event.get("kind"), event.get("layer"))] = event.get("epoch")
        self._update_trial(trial, "running", result)
        if result.get("checkpoint_path"):
            # A checkpoint came with it: a trial restored from it goes on after this epoch, so this row and the
            # trial's earlier ones must not die in the buffer with the driver; written now with the rest of the
            # buffer (a part per checkpointed report; the merges keep the files few). The trials table keeps its
            # throttle: a restored trial's reports rewrite its row.
            self._flush_rows()
        self._maybe_flush()

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        if self._loaded and self.buffer["epochs"]:  # as above, for a checkpoint Tune registers
            self._flush_rows()

    def on_step_end(self, iteration, trials, **info) -> None:
        if self._loaded:  # rows buffered while no trial reports are written once due
            self._maybe_flush()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        # The status comes from the epochs written so far, not from Tune's last result: after a resume, a trial
        # that had finished just before the driver died ends again with a stale last result.
        self._load()
        h = self.history.get(trial.trial_id)
        last = ({"epoch": h.epochs[-1].epoch, "stopped": h.epochs[-1].stopped, "verdict": h.epochs[-1].verdict}
                if h and h.epochs else trial.last_result)
        self._update_trial(trial, trial_status(last, False, self.epochs), trial.last_result)
        self._maybe_flush(now=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._load()
        self._update_trial(trial, "failed", trial.last_result, error=failure(trial, self.logs))
        self._maybe_flush(now=True)

    def on_experiment_end(self, trials, **info) -> None:
        self.compact()

    # -------------------------------------------------------------------------------------------- the row

    def _update_trial(self, trial, status: str, result: dict | None, error: str | None = None) -> None:
        tid, result = trial.trial_id, result or {}
        h = self._history(tid)
        first, last, flagged = (h.epochs[0], h.epochs[-1], h.flagged) if h.epochs else (None, None, None)
        res = self.resources
        pos = self.trial_pos.get(tid)
        self._set_trial({
            "study": self.study, "trial_id": tid, **{p.name: trial.config.get(p.name) for p in self.params},
            "status": status,
            "epochs_done": last.epoch if last else 0,
            "knn_top1": last.knn_top1 if last else math.nan,
            "knn_top1_best": h.best,
            "knn_top1_init": first.knn_top1_init if first else math.nan,
            "rankme": last.rankme if last else math.nan,
            "loss": last.loss if last else math.nan,
            "verdict": flagged.verdict if flagged else None,
            "verdict_reason": flagged.verdict_reason if flagged else None,
            "verdict_epoch": flagged.epoch if flagged else None,
            "spike_episodes": h.spikes,
            "knn_dips": h.dips,
            "max_spike_ratio": h.ratio,
            "events": len(h.events),
            "time_total_s": number(result.get("time_total_s")),
            "workers": res.workers, "cpus_per_worker": res.cpus_per_worker, "gpus_per_worker": res.gpus_per_worker,
            # TuneReportCallback adds the path to the results that came with a checkpoint: keep the latest.
            "checkpoint": self._uri(result.get("checkpoint_path")) or (self.trial_cols["checkpoint"][pos]
                                                                       if pos is not None else None),
            "error": error,
        })
        self.trials_dirty = True

    def _uri(self, path: str | None) -> str | None:
        return f"{self.scheme}{path}" if path and self.scheme and "://" not in path else path

    def _set_trial(self, row: dict) -> None:
        pos = self.trial_pos.get(row["trial_id"])
        if pos is None:
            self.trial_pos[row["trial_id"]] = len(self.trial_pos)
            for name, column in self.trial_cols.items():
                column.append(row.get(name))
        else:
            for name, column in self.trial_cols.items():
                column[pos] = row.get(name)


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


class Results:
    """The result tables of one study directory, or of every study under a root, as pyarrow datasets.

    ``trials``, ``epochs`` and ``events`` are :class:`pyarrow.dataset.Dataset` objects with the union of their
    schemas (studies searching different parameters read together; missing columns are null) and a ``study``
    column: ``r.trials.to_table(filter=pc.field("status") == "completed")``. ``epochs`` and ``events`` of
    finished studies are datasets over the Parquet files (filters are pushed down to the scan); the trials table
    (one row per trial, rewritten while a study runs) and a table with parts not yet compacted (a study running,
    or killed) are read whole, as :func:`read_table` reads them, into in-memory datasets. :meth:`table` reads one.
    """

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = list(dirs)
        self.files = {name: [d / f"{name}.parquet" for d in self.dirs if (d / f"{name}.parquet").exists()]
                      for name in TABLES}
        for name in TABLES:
            setattr(self, name, self._dataset(name))

    def _dataset(self, name: str):
        import pyarrow.dataset as ds

        if name in APPENDED and not any(parts(d, name) for d in self.dirs):
            return _dataset(self.files[name])
        tables = []
        for d in self.dirs:
            try:
                tables.append(read_folder(d, name).replace_schema_metadata(None))
            except FileNotFoundError:
                continue
        return ds.dataset(pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({}))

    def table(self, name: str = "trials", **to_table) -> pa.Table:
        return getattr(self, name).to_table(**to_table)

    @property
    def studies(self) -> list[str]:
        return sorted({p.parent.parent.name for p in self.files["trials"]})


def _dataset(files: list[Path | ObjectPath]):
    import pyarrow.dataset as ds

    if not files:
        return ds.dataset(pa.table({}))
    remote = isinstance(files[0], ObjectPath)  # one filesystem: the files of one study, or one root
    fs, names = (files[0].fs, [f.key for f in files]) if remote else (None, [str(f) for f in files])
    schema = pa.unify_schemas([pq.read_schema(n, filesystem=fs).remove_metadata() for n in names],
                              promote_options="permissive")
    return ds.dataset(names, schema=schema, format="parquet", filesystem=fs)


def open(path: str | Path | ObjectPath) -> Results:  # the documented name, study.results.open; shadows the builtin
    """The results under ``path``: a study directory (``<storage>/<name>``) or a root holding several; a path or
    an object-storage URI (``s3://bucket/prefix/name``)."""
    path = location(path)
    here = path / "results"
    dirs = [here] if here.is_dir() else sorted((p / "results" for p in path.iterdir() if (p / "results").is_dir()),
                                               key=str)
    if not dirs:
        raise FileNotFoundError(f"{path}: no results (expected {here}/*.parquet or <study>/results/ below it)")
    return Results(dirs)
