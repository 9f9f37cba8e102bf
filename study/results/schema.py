"""The tables' schemas: the three a study writes as it runs, derived from the typed rows
(:class:`trainers.records.EpochRecord` (``epochs``), :class:`trainers.events.Event` (``events``) and
:class:`TrialRow` (``trials``, with a column per searched parameter)), and ``evaluations``, written by
``ssl-study evaluate`` (study/evaluate.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import pyarrow as pa

from search_spaces import Param
from trainers.events import Event
from trainers.records import EpochRecord, columns_of

SCHEMA_VERSION = 3  # 2: rankme and epoch_time_s; 3: the trials' knn_dips is knn_dip_count, as in epochs
TABLES = ("trials", "epochs", "events")  # what a study writes while it runs (study/results/writer.py)
ALL_TABLES = (*TABLES, "evaluations")  # what the reader reads: those and study/evaluate.py's
APPENDED = ("epochs", "events")  # the tables kept as a compacted file plus parts
RENAMED = {"knn_dips": "knn_dip_count"}  # old column -> new, for tables of an older schema version
KEY = [("study", pa.string()), ("trial_id", pa.string())]
UNIQUE = {"epochs": ["trial_id", "epoch"], "events": ["trial_id", "step", "kind", "layer"]}  # last one wins
_ARROW = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "str | None": pa.string(),
          "int | None": pa.int64()}

NAN = math.nan


@dataclass
class TrialRow:
    """A trial's row of the ``trials`` table (after ``study``, ``trial_id`` and the searched parameters).

    ``knn_top1`` and ``rankme``, ``loss``: its last epoch's; ``knn_top1_best``: its best epoch's;
    ``knn_top1_init``: at initialisation; ``verdict*``: the policy's first verdict on it (also in observe mode: the
    epoch the policy would have stopped it); ``spike_episodes``, ``knn_dip_count``: totals over its epochs;
    ``max_spike_ratio``: the largest of them; ``events``: instability events; ``checkpoint``: its latest.
    """

    status: str
    epochs_done: int = 0
    knn_top1: float = NAN
    knn_top1_best: float = NAN
    knn_top1_init: float = NAN
    rankme: float = NAN
    loss: float = NAN
    verdict: str | None = None
    verdict_reason: str | None = None
    verdict_epoch: int | None = None
    spike_episodes: float = 0.0
    knn_dip_count: float = 0.0
    max_spike_ratio: float = NAN
    events: int = 0
    time_total_s: float = NAN
    workers: int = 1
    cpus_per_worker: float = NAN
    gpus_per_worker: float = NAN
    checkpoint: str | None = None
    error: str | None = None


def _fields(columns) -> list[tuple[str, pa.DataType]]:
    return [(name, _ARROW[kind]) for name, kind in columns]


def epochs_schema(record: type[EpochRecord] = EpochRecord) -> pa.Schema:
    return pa.schema([*KEY, *_fields(record.columns())])


EPOCHS_SCHEMA = epochs_schema()
EVENTS_SCHEMA = pa.schema([*KEY, *_fields(columns_of(Event))])
TRIAL_COLUMNS = tuple(f.name for f in fields(TrialRow))
# What a terminal shows of a trial (``launch``'s summary, ``status``), after its id and parameters; ``best`` and
# the report show the numbers among them.
SUMMARY_COLUMNS = ("status", "epochs_done", "knn_top1_init", "knn_top1", "knn_top1_best", "loss", "verdict",
                   "time_total_s")
assert set(SUMMARY_COLUMNS) <= set(TRIAL_COLUMNS)


# One row per evaluation of a trial's exported backbone (study/evaluate.py): its key is trial_id, protocol and
# settings (the JSON of every setting, keys sorted); epochs (linear), k (knn) and lr (linear, scaled) repeat the
# ones a query filters on. top5: the label among the 5 best classes.
EVALUATIONS_SCHEMA = pa.schema([*KEY, ("protocol", pa.string()), ("settings", pa.string()), ("epochs", pa.int64()),
                                ("k", pa.int64()), ("lr", pa.float64()), ("top1", pa.float64()),
                                ("top5", pa.float64()), ("seconds", pa.float64()),
                                ("evaluated_at", pa.timestamp("s", tz="UTC"))])


def _param_type(param: Param) -> pa.DataType:
    if param.kind in ("log", "uniform"):
        return pa.float64()
    if param.kind == "int":
        return pa.int64()
    return pa.array(list(param.args)).type  # choice: the type of its values


def trials_schema(params: list[Param]) -> pa.Schema:
    return pa.schema([*KEY, *[(p.name, _param_type(p)) for p in params],
                      *_fields(columns_of(TrialRow))])


def with_version(schema: pa.Schema, table: str) -> pa.Schema:
    return schema.with_metadata({"ssl_study.schema_version": str(SCHEMA_VERSION), "ssl_study.table": table})


def upgraded(table: pa.Table) -> pa.Table:
    """``table`` as the current schema names its columns (a table written by an older version)."""
    if not any(old in table.column_names for old in RENAMED):
        return table
    return table.rename_columns([RENAMED.get(c, c) for c in table.column_names])
