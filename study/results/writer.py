"""The Tune callback that writes a study's tables while it runs (:class:`ResultsWriter`); the layout it keeps is
described in ``study/results/__init__.py``."""

from __future__ import annotations

import math
import time
from collections import namedtuple
from dataclasses import asdict, dataclass

import pyarrow as pa
from ray.tune import Callback

from data.store import ObjectPath
from study.best import number
from study.results.files import PART, THROUGH, combine, part_name, parts, read, through, write_atomic
from study.results.schema import APPENDED, EVENTS_SCHEMA, TABLES, TrialRow, epochs_schema, trials_schema, with_version
from study.spec import StudySpec
from study.status import failure, trial_status
from trainers.records import EpochRecord

# What a trial's row needs of each of its epochs (EpochRecord fields): kept per epoch, a few numbers each.
_Epoch = namedtuple("_Epoch", ["epoch", "knn_top1", "knn_top1_init", "rankme", "loss", "verdict", "verdict_reason",
                               "spike_episodes", "knn_dip_count", "max_spike_ratio", "stopped"])


def _epoch(record: EpochRecord) -> _Epoch:
    return _Epoch(*(getattr(record, name) for name in _Epoch._fields))


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
        self.dips += e.knn_dip_count if math.isfinite(e.knn_dip_count) else 0.0
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

    def __init__(self, spec: StudySpec, *, clock=time.monotonic, record: type[EpochRecord] = EpochRecord,
                 **settings) -> None:
        self.study, self.out, self.logs = spec.name, spec.study_dir / "results", spec.study_dir / "logs"
        # Ray names a checkpoint in object storage by its path in the bucket: the table gives the whole URI
        self.scheme = f"{self.out.kind}://" if isinstance(self.out, ObjectPath) else ""
        self.params, self.epochs = spec.params, spec.train_config().epochs
        self.resources = spec.resources
        self.schemas = {"trials": with_version(trials_schema(self.params), "trials"),
                        "epochs": with_version(epochs_schema(record), "epochs"),
                        "events": with_version(EVENTS_SCHEMA, "events")}
        for key, value in settings.items():  # flush_every_s, part_rows, trials_every_s, merge_parts, chunk_rows
            if not hasattr(type(self), key):
                raise TypeError(f"ResultsWriter: unknown setting {key!r}")
            setattr(self, key, value)
        self.clock, self.record = clock, record  # the epochs table has a column per field of ``record``
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
                tables[name] = read(self.out, name)
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
            names = [n for n in (*_Epoch._fields, "trial_id") if n in epochs.column_names]  # an older table: fewer
            rows = sorted(epochs.select(names).to_pylist(), key=lambda r: (r["trial_id"], r["epoch"]))
            for row in rows:
                self._history(row["trial_id"]).add(_epoch(EpochRecord.from_report(row)))
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
                tables[name] = read(self.out, name) if (self.out / f"{name}.parquet").exists() or \
                    listed[name] else None
                self.stats["files_read"] += 1 + len(listed[name])
        done = self.seq - 1
        for name in ("events", "epochs"):
            table = tables.get(name)
            self._write(name, table if table is not None else self.schemas[name].empty_table(), f"{name}.parquet",
                        done)
        for name in APPENDED:  # every part they hold, the sources of a merge left behind by a crash too
            for path in self.out.glob(f"{name}-part-*.parquet"):
                m = PART.match(path.name)
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
        record = self.record.from_report({**result, "epoch": epoch})
        row = {"study": self.study, "trial_id": tid, **record.report()}
        if self.buffered_since is None:
            self.buffered_since = self.clock()
        self.buffer["epochs"].append(row)
        h.add(_epoch(record))
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
        row = TrialRow(
            status, epochs_done=last.epoch if last else 0,
            knn_top1=last.knn_top1 if last else math.nan, knn_top1_best=h.best,
            knn_top1_init=first.knn_top1_init if first else math.nan,
            rankme=last.rankme if last else math.nan, loss=last.loss if last else math.nan,
            verdict=flagged.verdict if flagged else None, verdict_reason=flagged.verdict_reason if flagged else None,
            verdict_epoch=flagged.epoch if flagged else None,
            spike_episodes=h.spikes, knn_dip_count=h.dips, max_spike_ratio=h.ratio, events=len(h.events),
            time_total_s=number(result.get("time_total_s")),
            workers=res.workers, cpus_per_worker=res.cpus_per_worker, gpus_per_worker=res.gpus_per_worker,
            # TuneReportCallback adds the path to the results that came with a checkpoint: keep the latest.
            checkpoint=self._uri(result.get("checkpoint_path")) or (self.trial_cols["checkpoint"][pos]
                                                                    if pos is not None else None),
            error=error)
        params = {p.name: trial.config.get(p.name) for p in self.params}
        self._set_trial({"study": self.study, "trial_id": tid, **params, **asdict(row)})
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
