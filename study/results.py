"""A study's results as Parquet tables, written while the study runs.

Under ``<storage>/<name>/results/``, with schema version :data:`SCHEMA_VERSION` in each file's metadata:

- ``trials.parquet``: one row per trial: ``study``, ``trial_id``, every searched parameter as its own typed
  column, ``status`` (study/status.py), epochs done, final / best / at-init kNN top-1, final loss, the
  instability verdict (also in observe mode: ``verdict`` and ``verdict_epoch`` say when the policy would have
  stopped it) and totals of the signals, wall time, resources, checkpoint path, error.
- ``epochs.parquet``: one row per trial per reported epoch: every metric of ``EPOCH_METRICS``.
- ``events.parquet``: one row per instability event (trainers/signals.py): step, epoch, kind, layer, magnitude.

:class:`ResultsWriter` is a Tune callback on the driver: it rewrites the tables after every reported epoch,
each to a temporary name then renamed, so a reader never sees a half-written file and a killed driver loses
at most the results in flight. It reloads the tables it finds, so a resumed study appends to them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from ray.tune import Callback

from data.atomic import atomic_path
from search_spaces import Param
from study.best import number
from study.spec import StudySpec
from study.status import failure, trial_status
from trainers.signals import SUMMARY_KEYS

SCHEMA_VERSION = 2  # 2: rankme and epoch_time_s
TABLES = ("trials", "epochs", "events")

EPOCH_METRICS = ("epoch", "loss", "lr", "moco_m", "knn_top1", "knn_top1_k200", "knn_top1_init", "rankme",
                 "dense_knn_last", "dense_knn_min", "online_probe_top1", "images_per_s", "step_time_s",
                 "epoch_time_s", *SUMMARY_KEYS)
_KEY = [("study", pa.string()), ("trial_id", pa.string())]
EPOCHS_SCHEMA = pa.schema([*_KEY, ("epoch", pa.int64()),
                           *[(m, pa.float64()) for m in EPOCH_METRICS if m != "epoch"],
                           ("verdict", pa.string()), ("verdict_reason", pa.string()), ("stopped", pa.int64())])
EVENTS_SCHEMA = pa.schema([*_KEY, ("step", pa.int64()), ("epoch", pa.int64()), ("kind", pa.string()),
                           ("layer", pa.string()), ("magnitude", pa.float64())])
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


def write_atomic(table: pa.Table, path: Path) -> Path:
    """Write ``table`` to ``path`` atomically (data/atomic.py): a reader sees the old table or the new one."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def _finite_max(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else math.nan


class ResultsWriter(Callback):
    """Tune callback that keeps ``trials``, ``epochs`` and ``events`` Parquet tables up to date."""

    def __init__(self, spec: StudySpec) -> None:
        self.study, self.out, self.logs = spec.name, spec.study_dir / "results", spec.study_dir / "logs"
        self.params, self.epochs = spec.params, spec.train_config().epochs
        self.resources = spec.resources
        self.schemas = {"trials": _with_version(trials_schema(self.params), "trials"),
                        "epochs": _with_version(EPOCHS_SCHEMA, "epochs"),
                        "events": _with_version(EVENTS_SCHEMA, "events")}
        self.rows: dict[str, dict[tuple, dict]] | None = None  # loaded on first use, after unpickling

    def __getstate__(self) -> dict:  # Tune pickles callbacks with its experiment: rows are reloaded from the files
        return {**self.__dict__, "rows": None}

    def _load(self) -> dict[str, dict[tuple, dict]]:
        """The rows of the tables already written (a resumed study), keyed for replacement."""
        if self.rows is None:
            self.rows = {name: {} for name in TABLES}
            for name in TABLES:
                path = self.out / f"{name}.parquet"
                for row in pq.read_table(path).to_pylist() if path.exists() else []:
                    self.rows[name][self._key(name, row)] = row
        return self.rows

    @staticmethod
    def _key(table: str, row: dict) -> tuple:
        if table == "trials":
            return (row["trial_id"],)
        if table == "epochs":
            return row["trial_id"], row["epoch"]
        return row["trial_id"], row["step"], row["kind"], row["layer"]

    def flush(self) -> None:
        for name, rows in self._load().items():
            table = pa.Table.from_pylist(list(rows.values()), schema=self.schemas[name])
            write_atomic(table, self.out / f"{name}.parquet")

    # ------------------------------------------------------------------------------------------ Tune hooks

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        rows = self._load()
        tid, epoch = trial.trial_id, int(result.get("epoch", 0))
        # A trial restarted from a checkpoint reports its later epochs again: they replace the old rows.
        for name in ("epochs", "events"):
            rows[name] = {k: r for k, r in rows[name].items() if not (k[0] == tid and r["epoch"] >= epoch)}
        row = {"study": self.study, "trial_id": tid, **{m: number(result.get(m)) for m in EPOCH_METRICS},
               "epoch": epoch, "verdict": result.get("verdict") or None,
               "verdict_reason": result.get("verdict_reason") or None, "stopped": int(result.get("stopped", 0))}
        rows["epochs"][(tid, epoch)] = row
        for event in result.get("events") or []:
            event = {"study": self.study, "trial_id": tid, **event, "magnitude": number(event.get("magnitude"))}
            rows["events"][self._key("events", event)] = event
        self._update_trial(trial, "running", result)
        self.flush()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        # The status comes from the epochs written so far, not from Tune's last result: after a resume, a trial
        # that had finished just before the driver died ends again with a stale last result.
        history = [r for k, r in self._load()["epochs"].items() if k[0] == trial.trial_id]
        last = max(history, key=lambda r: r["epoch"]) if history else trial.last_result
        self._update_trial(trial, trial_status(last, False, self.epochs), trial.last_result)
        self.flush()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._update_trial(trial, "failed", trial.last_result, error=failure(trial, self.logs))
        self.flush()

    def on_experiment_end(self, trials, **info) -> None:
        self.flush()

    # -------------------------------------------------------------------------------------------- the row

    def _update_trial(self, trial, status: str, result: dict | None, error: str | None = None) -> None:
        rows, tid, result = self._load(), trial.trial_id, result or {}
        history = sorted((r for k, r in rows["epochs"].items() if k[0] == tid), key=lambda r: r["epoch"])
        flagged = next((r for r in history if r["verdict"]), None)
        res = self.resources
        rows["trials"][(tid,)] = {
            "study": self.study, "trial_id": tid, **{p.name: trial.config.get(p.name) for p in self.params},
            "status": status,
            "epochs_done": history[-1]["epoch"] if history else 0,
            "knn_top1": history[-1]["knn_top1"] if history else math.nan,
            "knn_top1_best": _finite_max(r["knn_top1"] for r in history),
            "knn_top1_init": history[0]["knn_top1_init"] if history else math.nan,
            "rankme": history[-1]["rankme"] if history else math.nan,
            "loss": history[-1]["loss"] if history else math.nan,
            "verdict": flagged["verdict"] if flagged else None,
            "verdict_reason": flagged["verdict_reason"] if flagged else None,
            "verdict_epoch": flagged["epoch"] if flagged else None,
            "spike_episodes": sum(r["spike_episodes"] for r in history if math.isfinite(r["spike_episodes"])),
            "knn_dips": sum(r["knn_dip_count"] for r in history if math.isfinite(r["knn_dip_count"])),
            "max_spike_ratio": _finite_max(r["max_spike_ratio"] for r in history),
            "events": sum(1 for k in rows["events"] if k[0] == tid),
            "time_total_s": number(result.get("time_total_s")),
            "workers": res.workers, "cpus_per_worker": res.cpus_per_worker, "gpus_per_worker": res.gpus_per_worker,
            # TuneReportCallback adds the path to the results that came with a checkpoint: keep the latest.
            "checkpoint": result.get("checkpoint_path") or rows["trials"].get((tid,), {}).get("checkpoint"),
            "error": error,
        }


def read(study_dir: Path, table: str = "trials") -> pa.Table:
    return pq.read_table(Path(study_dir) / "results" / f"{table}.parquet")


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

    ``trials``, ``epochs`` and ``events`` are :class:`pyarrow.dataset.Dataset` objects over the Parquet files,
    with the union of their schemas (studies searching different parameters read together; missing columns are
    null) and a ``study`` column, so filters are pushed down: ``r.trials.to_table(filter=pc.field("status") ==
    "completed")``. :meth:`table` reads one whole.
    """

    def __init__(self, files: dict[str, list[Path]]) -> None:
        self.files = files
        for name in TABLES:
            setattr(self, name, _dataset(files[name]))

    def table(self, name: str = "trials", **to_table) -> pa.Table:
        return getattr(self, name).to_table(**to_table)

    @property
    def studies(self) -> list[str]:
        return sorted({p.parent.parent.name for p in self.files["trials"]})


def _dataset(files: list[Path]):
    import pyarrow.dataset as ds

    if not files:
        return ds.dataset(pa.table({}))
    schema = pa.unify_schemas([pq.read_schema(f).remove_metadata() for f in files], promote_options="permissive")
    return ds.dataset([str(f) for f in files], schema=schema, format="parquet")


def open(path: str | Path) -> Results:  # the documented name, study.results.open; shadows the builtin here
    """The results under ``path``: a study directory (``<storage>/<name>``) or a root holding several."""
    path = Path(path)
    here = path / "results"
    dirs = [here] if here.is_dir() else sorted(p for p in path.glob("*/results") if p.is_dir())
    if not dirs:
        raise FileNotFoundError(f"{path}: no results (expected {here}/*.parquet or <study>/results/ below it)")
    return Results({name: [d / f"{name}.parquet" for d in dirs if (d / f"{name}.parquet").exists()]
                    for name in TABLES})
