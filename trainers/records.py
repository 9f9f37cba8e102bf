"""One epoch of a run as typed data: what the Trainer and its callbacks report, and the row of the ``epochs`` table.

Free of torch (the study's driver, the results writer, the replay and the report read it without a model). Every
list of an epoch's metrics is derived from :class:`EpochRecord`'s fields: the Parquet schema (study/results), the
writer's per-trial history, the replay's reports and the report's columns. A new metric is one field here and its
producer (the Trainer, or a callback writing ``metrics[name]`` in ``on_epoch_end``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from trainers.events import SUMMARY_KEYS, EpochSignals

NAN = math.nan


def _kind(annotation) -> str:
    """A field's type as its source spells it ("float", "str | None"), whether or not annotations are strings."""
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def columns_of(cls) -> tuple[tuple[str, str], ...]:
    """(name, type as spelled) of every field of the dataclass ``cls``: a table's columns (study/results/schema.py)."""
    return tuple((f.name, _kind(f.type)) for f in fields(cls))


@dataclass
class EpochRecord(EpochSignals):
    """One epoch of one run (the instability numbers of :class:`EpochSignals` included).

    Produced by ``Trainer.train_epoch`` (loss .. step_time_s), ``Trainer.evaluate`` and ``Trainer.epochs``
    (knn_top1 .. epoch_time_s), and the callbacks: ``DenseKnn`` (dense_knn_*), ``OnlineProbe``
    (online_probe_top1), ``Signals`` (the :class:`EpochSignals` fields) and ``Verdict`` (verdict, verdict_reason,
    stopped). A metric its callback does not measure (switched off) stays at its default: NaN.
    """

    epoch: int = 0  # 1-based: the number of epochs trained
    loss: float = NAN
    lr: float = NAN
    moco_m: float = NAN
    images_per_s: float = NAN
    step_time_s: float = NAN
    knn_top1: float = NAN
    knn_top1_k200: float = NAN
    knn_top1_init: float = NAN
    rankme: float = NAN
    epoch_time_s: float = NAN  # the compute a replay counts
    dense_knn_last: float = NAN
    dense_knn_min: float = NAN
    online_probe_top1: float = NAN
    verdict: str | None = None
    verdict_reason: str | None = None
    stopped: int = 0

    @classmethod
    def columns(cls) -> tuple[tuple[str, str], ...]:
        """(name, type) of every field, the record's own first, then the signals: the ``epochs`` table's order."""
        own = [c for c in columns_of(cls) if c[0] not in SUMMARY_KEYS]
        return (*own, *columns_of(EpochSignals))

    @classmethod
    def metrics(cls) -> tuple[str, ...]:
        """The numeric fields (``epoch`` and ``stopped`` included)."""
        return tuple(name for name, kind in cls.columns() if kind in ("int", "float"))

    @classmethod
    def from_report(cls, report: Mapping) -> EpochRecord:
        """The record of a report or an ``epochs`` row: missing keys take their defaults, None numbers NaN, other
        keys (``events``, ``study``, ``trial_id``) are left out."""
        values = {}
        for name, kind in cls.columns():
            if name not in report:
                continue
            v = report[name]
            if kind == "float":
                v = float(v) if isinstance(v, int | float) and not isinstance(v, bool) else NAN
            elif kind == "int":
                v = int(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else 0
            else:
                v = v or None
            values[name] = v
        return cls(**values)

    def report(self) -> dict:
        return asdict(self)


EVALUATED = ("knn_top1", "knn_top1_k200", "rankme")  # what Trainer.evaluate measures on the weights


def halted(report: dict) -> dict:
    """``report`` of an epoch that ended with non-finite weights: nothing measured on them is meaningful, so the
    Trainer does not evaluate (and a replay of such a run reports the same)."""
    return {**report, **dict.fromkeys(EVALUATED, NAN)}
