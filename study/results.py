"""Results tables of a study as Parquet: ``trials`` (one row per trial) and ``epochs`` (one per reported epoch).

Files are written to a temporary name and renamed, so a reader never sees a half-written table.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from ray.tune import ResultGrid

from study.spec import StudySpec
from trainers.signals import SUMMARY_KEYS

EPOCH_METRICS = ("epoch", "loss", "lr", "moco_m", "knn_top1", "knn_top1_k200", "knn_top1_init", "dense_knn_last",
                 "dense_knn_min", "online_probe_top1", "images_per_s", "step_time_s", *SUMMARY_KEYS)


def trial_status(result, epochs: int) -> str:
    """completed: ran every epoch; pruned: stopped early by the scheduler; failed: raised."""
    if result.error is not None:
        return "failed"
    return "completed" if (result.metrics or {}).get("epoch", 0) >= epochs else "pruned"


def _finite_max(values) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return max(finite) if finite else math.nan


def tables(spec: StudySpec, grid: ResultGrid) -> tuple[pa.Table, pa.Table]:
    epochs = spec.train_config().epochs
    names = [p.name for p in spec.params]
    trials, rows = [], []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        history = result.metrics_dataframe
        history = history.to_dict("records") if history is not None else []
        trials.append({
            "study": spec.name,
            "trial_id": trial_id,
            "status": trial_status(result, epochs),
            **{name: result.config.get(name) for name in names},
            "epochs_done": int(metrics.get("epoch", 0)),
            "knn_top1": metrics.get("knn_top1", math.nan),
            "knn_top1_best": _finite_max(r.get("knn_top1") for r in history),
            "knn_top1_init": metrics.get("knn_top1_init", math.nan),
            "loss": metrics.get("loss", math.nan),
            "time_total_s": metrics.get("time_total_s", math.nan),
            "checkpoint": metrics.get("checkpoint_path"),  # added by TuneReportCallback
            "error": str(result.error).splitlines()[0] if result.error else None,
        })
        rows += [{"study": spec.name, "trial_id": trial_id, **{k: r.get(k) for k in EPOCH_METRICS}}
                 for r in history]
    return pa.Table.from_pylist(trials), pa.Table.from_pylist(rows)


def write_atomic(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def write(spec: StudySpec, grid: ResultGrid) -> pa.Table:
    trials, epochs = tables(spec, grid)
    out = spec.study_dir / "results"
    write_atomic(trials, out / "trials.parquet")
    write_atomic(epochs, out / "epochs.parquet")
    return trials


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
