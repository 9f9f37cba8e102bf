"""Replay a recorded study through the real search stack, without training.

A record is a finished observe-mode study (every run to its full budget under FIFO, the policy's verdicts only
recorded): a study directory, or a record folder under ``bench/records/`` (its study files beside the exported
``trials``/``epochs``/``events`` tables). Its runs are grouped by cell (the searched parameters other than
``seed``); a cell with several seeds holds several runs.

A replay is an ordinary Tune experiment built by :func:`study.runner.build_tuner`: the same
:class:`~study.search.StudySearch` (Optuna's sampler), the same ASHA or FIFO scheduler, and a trainable,
:func:`replay_trial`, that plays one recorded run of the suggested cell back epoch by epoch (its metrics, signal
summaries and events) and applies the same :func:`trainers.policy.verdict` to them as the trainer does, so
``enforce`` stops the run where the trainer would have. Nothing of ASHA, TPE or the policy is re-implemented.
Compute is counted in epochs played (and the recorded seconds of those epochs); a replay's answer is the
best completed trial by the study metric, and its quality the mean final kNN top-1 of that cell over the
record's seeds (what the configuration is worth, not the luck of the seed that was played).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from study.best import finite
from study.results import files
from study.spec import SpecError, StudySpec, _build
from study.status import trial_status
from trainers.detectors import Detectors
from trainers.policy import DETECTOR_FIELDS, StopPolicy, history_entry, verdict, verdict_report
from trainers.records import halted

RECORDS = Path(__file__).resolve().parent.parent / "bench" / "records"
DEFAULT_RECORD = "mocov3-fmnist-grid"


@dataclass
class Run:
    trial_id: str
    seed: int
    epochs: list[dict]  # epochs-table rows, in order
    events: dict[int, list[dict]]  # by epoch
    batch_size: int = 0  # global: the images of one dense kNN measurement
    trace: list[dict] = field(default_factory=list)  # per measured step (trainers/callbacks.py: Trace), if recorded

    @property
    def final(self) -> float:
        v = self.epochs[-1]["knn_top1"]
        return v if v is not None and math.isfinite(v) else math.nan


@dataclass
class Record:
    """The runs of a recorded study, by cell."""

    name: str
    axes: dict[str, list]  # searched parameter -> recorded values (seed left out)
    runs: dict[tuple, list[Run]]  # cell (values in axes order) -> runs, by seed
    epochs: int
    stopping: StopPolicy  # the policy the record ran with (its detector thresholds are fixed)
    feature_dim: int  # of the features the collapse std was measured on
    seconds: float = field(default=0.0)  # recorded seconds of every epoch of every run
    knn_images: int = 0  # test images of each epoch kNN
    _detected: dict = field(default_factory=dict, repr=False, compare=False)  # detector settings -> Record

    @property
    def traced(self) -> bool:
        return all(run.trace for runs in self.runs.values() for run in runs)

    def with_detectors(self, policy: StopPolicy) -> Record:
        """This record with every run's signal summaries recomputed from its trace by ``policy``'s detectors
        (:func:`detector_summaries`); the record itself when it holds no traces."""
        if not self.traced:
            return self
        key = tuple(sorted(policy.monitor_options().items()))
        if key not in self._detected:
            runs = {cell: [replace(run, epochs=detector_summaries(run, policy, self.knn_images)) for run in rs]
                    for cell, rs in self.runs.items()}
            self._detected[key] = replace(self, runs=runs, stopping=replace(self.stopping, **policy.monitor_options()),
                                          _detected={})
        return self._detected[key]

    def without_traces(self) -> Record:
        """What a replaying trial needs: the traces (5 MB pickled in the first record, 0.1 s to load) stay with
        the driver, which recomputes the detectors from them (:meth:`with_detectors`)."""
        runs = {cell: [replace(run, trace=[]) for run in rs] for cell, rs in self.runs.items()}
        return replace(self, runs=runs, _detected={})

    def cell(self, config: dict) -> tuple:
        return tuple(config[a] for a in self.axes)

    def truth(self, cell: tuple) -> float:
        """The cell's worth: mean final kNN top-1 over its seeds (a diverged seed counts as 0)."""
        return statistics.mean(0.0 if math.isnan(r.final) else r.final for r in self.runs[cell])

    def best_cell(self) -> tuple:
        return max(self.runs, key=self.truth)

    def pick(self, cell: tuple, seed: int) -> Run:
        """The run of ``cell`` that replay ``seed`` plays: each replay seed is one world in which every
        configuration has one outcome, as in a real study whose runs are seeded (a repeat trains the same)."""
        runs = self.runs[cell]
        return runs[random.Random(f"{seed}:{cell}").randrange(len(runs))]

    def space(self) -> dict:
        return {a: {"choice": values} for a, values in self.axes.items()}


def _yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: cannot read the recorded study file ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: not a study file (expected a mapping)")
    return data


def _sources(name: str, storage: str) -> tuple[str, list[dict], Path]:
    """The recorded study files and the folder holding their tables, for a study or a record folder."""
    for folder in (Path(name), Path(storage) / name, RECORDS / name):
        if (folder / "study.yaml").is_file() and (folder / "results" / "trials.parquet").is_file():
            return folder.name, [_yaml(folder / "study.yaml")], folder / "results"
        if (folder / "trials.parquet").is_file() and list(folder.glob("*.yaml")):
            return folder.name, [_yaml(f) for f in sorted(folder.glob("*.yaml"))], folder
    shipped = ", ".join(sorted(p.parent.name for p in RECORDS.glob("*/trials.parquet"))) or "none"
    raise SpecError(f"{name}: no record found (a finished study directory or name under {storage}/, or a record "
                    f"under {RECORDS}: {shipped})")


def load_record(name: str = DEFAULT_RECORD, storage: str = "runs", whole_grid: bool = True) -> Record:
    """Read a record; a study not run to its full budget in observe mode is refused with one line, and so is
    a grid with missing cells (a search over it would suggest them) unless ``whole_grid`` is False."""
    from trainers.registry import VIT_CONFIGS

    label, studies, tables = _sources(name, storage)
    for s in studies:
        mode = (s.get("stopping") or {}).get("mode", "enforce")
        scheduler = (s.get("scheduler") or {}).get("type", "asha")
        if mode != "observe" or scheduler != "fifo":
            raise SpecError(f"{name}: study {s.get('name')!r} ran with stopping.mode {mode!r} and scheduler "
                            f"{scheduler!r}; a replay needs every run to its full budget: stopping.mode: observe "
                            f"and scheduler.type: fifo")
    first = studies[0]
    train = first.get("train") or {}
    axes: dict[str, list] = {}
    for s in studies:
        for key, dist in ((s.get("search") or {}).get("space") or {}).items():
            if key != "seed":
                if not isinstance(dist, dict) or "choice" not in dist:
                    raise SpecError(f"{name}: search.space.{key}: a record needs choice lists (a grid); got {dist!r}")
                axes[key] = sorted(set(axes.get(key, [])) | set(dist["choice"]))

    trials = files.read(tables, "trials").to_pylist()
    epochs = files.read(tables, "epochs").to_pylist()
    try:
        events = files.read(tables, "events").to_pylist()
    except FileNotFoundError:
        events = []
    by_trial: dict[tuple, list[dict]] = {}
    for row in epochs:
        by_trial.setdefault((row["study"], row["trial_id"]), []).append(row)
    events_by: dict[tuple, dict[int, list[dict]]] = {}
    for e in events:
        events_by.setdefault((e["study"], e["trial_id"]), {}).setdefault(e["epoch"], []).append(e)
    budget = int(train.get("epochs", 3))
    traces = _traces(tables, trials)
    runs: dict[tuple, list[Run]] = {}
    for t in trials:
        key = (t["study"], t["trial_id"])
        history = sorted(by_trial.get(key, []), key=lambda r: r["epoch"])
        if t["status"] != "completed" or len(history) != budget:  # failed or unfinished runs are not replayed
            continue
        batch = int(t.get("batch_size") or train.get("batch_size", 256))
        run = Run(t["trial_id"], int(t.get("seed") or 0), history, events_by.get(key, {}), batch, traces.get(key, []))
        runs.setdefault(tuple(t[a] for a in axes), []).append(run)
    if not runs:
        raise SpecError(f"{name}: the record holds no run completed to its {budget} epochs")
    axes = {a: [v for v in values if any(c[i] == v for c in runs)] for i, (a, values) in enumerate(axes.items())}
    if whole_grid and len(runs) != math.prod(map(len, axes.values())):
        raise SpecError(f"{name}: the record covers {len(runs)} of the {math.prod(map(len, axes.values()))} cells "
                        f"of its grid; finish it first (`ssl-study resume`, or bench/record.py)")
    for cell in runs:
        runs[cell].sort(key=lambda r: r.seed)
    stopping = _build(StopPolicy, first.get("stopping") or {}, f"{name}: stopping")
    backbone = train.get("backbone", "vit_nano_patch4_32")
    dim = VIT_CONFIGS[backbone]["embed_dim"] if backbone in VIT_CONFIGS else 2048
    seconds = sum(r["epoch_time_s"] or 0.0 for rs in runs.values() for run in rs for r in run.epochs)
    knn_images = int(train.get("knn_eval_subset") or 0) or TEST_IMAGES.get(first.get("dataset", ""), 0)
    return Record(label, axes, runs, budget, stopping, dim, seconds, knn_images)


TEST_IMAGES = {"fashion_mnist": 10_000, "mnist": 10_000}  # a record's epoch kNN without knn_eval_subset


def _traces(tables: Path, trials: list[dict]) -> dict[tuple, list[dict]]:
    """Every run's per-step trace by (study, trial_id): a record's ``traces.parquet`` or its file per run under
    ``traces/`` (bench/record_runs.py), or the ``trace.parquet`` beside each trial's last checkpoint in a study
    directory."""
    import pyarrow.parquet as pq

    found = sorted(tables.glob("traces/*.parquet")) + [p for p in [tables / "traces.parquet"] if p.is_file()]
    if found:
        out: dict[tuple, list[dict]] = {}
        for path in found:
            for row in pq.read_table(path).to_pylist():
                out.setdefault((row.pop("study"), row.pop("trial_id")), []).append(row)
    else:
        out = {(t["study"], t["trial_id"]): pq.read_table(Path(t["checkpoint"]) / "trace.parquet").to_pylist()
               for t in trials if t.get("checkpoint") and (Path(t["checkpoint"]) / "trace.parquet").is_file()}
    return {k: sorted(rows, key=lambda r: r["step"]) for k, rows in out.items()}


RECOMPUTED = ("spike_count", "spike_episodes", "max_spike_ratio", "first_layer_lead_steps", "first_layer_led_frac",
              "worst_knn_dip", "knn_dip_z", "knn_dip_count", "epoch_knn_dip", "epoch_knn_se")  # from a trace


def detector_summaries(run: Run, policy: StopPolicy, knn_images: int) -> list[dict]:
    """``run``'s epoch rows with the signal summaries that ``policy``'s detectors compute from its trace, as the
    live :class:`trainers.signals.InstabilityMonitor` does: each measured step's finite gradient norms, each dense
    kNN value (of ``run.batch_size`` images) and each epoch's kNN top-1. The loss spikes, collapse and non-finite
    flags are the recorded ones (a trace holds no loss)."""
    groups = [k[5:] for k in run.trace[0] if k.startswith("grad_") and any(finite(r[k]) for r in run.trace)]
    by_epoch: dict[int, list[dict]] = {}
    for r in run.trace:
        by_epoch.setdefault(r["epoch"], []).append(r)
    steps = max(len(rows) for rows in by_epoch.values())
    dense = max(sum(finite(r["dense_knn"]) for r in rows) for rows in by_epoch.values())
    detectors = Detectors(**policy.monitor_options(), spike_tests=steps, dense_tests=max(dense, 1),
                          dense_images=run.batch_size, knn_images=knn_images, groups=groups)
    out = []
    for row in run.epochs:
        rows = by_epoch.get(row["epoch"], [])
        for r in rows:
            norms = {g: r[f"grad_{g}"] for g in groups if finite(r[f"grad_{g}"])}
            detectors.on_grads(r["step"], r["epoch"] - 1, norms)
            if finite(r["dense_knn"]):
                detectors.on_dense_knn(r["step"], r["epoch"] - 1, r["dense_knn"])
        if row["knn_top1"] is not None:
            detectors.on_epoch_knn(rows[-1]["step"] if rows else 0, row["epoch"] - 1, row["knn_top1"])
        summary = detectors.epoch_summary()
        out.append({**row, **{k: summary[k] for k in RECOMPUTED}})
    return out


def replay_policy(record: Record, mode: str, overrides: dict) -> StopPolicy:
    """The recorded policy with ``overrides``. Detector settings change only where the record holds every run's
    trace (the detectors' counts are then recomputed from it: :meth:`Record.with_detectors`)."""
    for key in overrides:
        if key in DETECTOR_FIELDS and overrides[key] != getattr(record.stopping, key) and not record.traced:
            raise SpecError(f"--policy {key}: the record holds no per-step traces, so its spikes and dips stay "
                            f"as measured with {key} {getattr(record.stopping, key)!r}; a replay can change: "
                            f"{', '.join(k for k in StopPolicy.__dataclass_fields__ if k not in DETECTOR_FIELDS)}")
    try:
        return replace(record.stopping, mode=mode, **overrides)
    except (TypeError, ValueError) as e:
        raise SpecError(f"--policy: {e}") from None


def summary(row: dict, policy: StopPolicy, feature_dim: int) -> dict:
    """The epoch summary :func:`trainers.policy.verdict` judges, with the collapse flag of ``policy``'s threshold."""
    s = history_entry(row)
    std = s.get("collapse_std_min")
    s["collapsed"] = float(std is not None and std < policy.collapse_threshold / math.sqrt(feature_dim))
    return s


def first_verdict(rows: Sequence[dict], policy: StopPolicy, feature_dim: int) -> tuple[int, str, str] | None:
    """(epoch, status, reason) of the first verdict ``policy`` gives on a run's recorded epochs, or None."""
    history = []
    for row in rows:
        history.append(summary(row, policy, feature_dim))
        if (judged := verdict(history, policy)) is not None:
            return row["epoch"], *judged
    return None


def replay_trial(config: dict, *, record: Record, policy: StopPolicy, seed: int, pauses: bool = False) -> None:
    """Tune function trainable: report one recorded run of the suggested cell, epoch by epoch, as the trainer
    reported it, and stop where ``policy`` (enforce) would have stopped the real run. ``pauses``: a scheduler may
    pause it (Hyperband): every epoch comes with a checkpoint (the epochs played), as the real trainer's does, and a
    resumed trial goes on after it."""
    from ray import tune

    run = record.pick(record.cell(config), seed)
    # a line per epoch's checkpoint ("Checkpoint successfully created") and per resume ("Restored on ...") on the
    # driver's console: a Hyperband replay makes hundreds
    for name in ("ray.train", "ray.tune.trainable"):
        logging.getLogger(name).setLevel(logging.WARNING)
    done = 0
    if (checkpoint := tune.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            done = int((Path(folder) / "epochs").read_text())
    history = [summary(row, policy, record.feature_dim) for row in run.epochs[:done]]
    for row in run.epochs[done:]:
        history.append(summary(row, policy, record.feature_dim))
        judged = verdict(history, policy)
        metrics = {**row, **verdict_report(judged, policy)}
        if metrics["stopped"] and judged[0] == "diverged":  # as the Trainer reports a run that halted
            metrics = halted(metrics)
        metrics.update(events=[{k: e[k] for k in ("step", "epoch", "kind", "layer", "magnitude")}
                               for e in run.events.get(row["epoch"], [])],
                       replayed_trial=run.trial_id, replayed_seed=run.seed)
        metrics.pop("study", None), metrics.pop("trial_id", None)  # the report is of the replaying trial
        if pauses:
            with tempfile.TemporaryDirectory(prefix="replay-") as folder:
                (Path(folder) / "epochs").write_text(str(row["epoch"]))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        else:
            tune.report(metrics)
        if metrics["stopped"]:
            return


# ----------------------------------------------------------------------------------------- the experiment


@dataclass
class Strategy:
    """What a replay varies: the study file's search, scheduler and stopping sections."""

    name: str
    sampler: str = "tpe"
    scheduler: str = "fifo"
    stopping: str = "observe"  # the policy's mode
    policy: dict = field(default_factory=dict)  # StopPolicy overrides
    metric: str = "knn_top1"
    constraints: bool = False
    startup_trials: int = 10
    startup: str = "random"  # how TPE's first trials are drawn: random, or a Sobol design
    rerun_duplicates: bool = False
    grace_period: int = 1
    reduction_factor: int = 2


def replay_spec(record: Record, strategy: Strategy, trials: int, seed: int, root: Path) -> StudySpec:
    """The study a replay runs: the record's grid as the space, ``strategy``'s search, scheduler and stopping.
    Nothing trains, so nothing is checked against a dataset or the machine's resources."""
    from study.spec import Resources, Scheduler, Search

    return StudySpec(
        name=f"replay-{record.name}-{strategy.name}-{seed}", storage=str(root), train={"epochs": record.epochs},
        resources=Resources(workers=1, cpus_per_worker=0.01, driver_cpus=0.01, check=False),
        search=Search(space=record.space(), num_samples=trials, max_concurrent=1, metric=strategy.metric,
                      mode="max", sampler=strategy.sampler, seed=seed, constraints=strategy.constraints,
                      startup_trials=strategy.startup_trials, startup=strategy.startup,
                      rerun_duplicates=strategy.rerun_duplicates),
        scheduler=Scheduler(type=strategy.scheduler, grace_period=strategy.grace_period,
                            reduction_factor=strategy.reduction_factor),
        stopping=replay_policy(record, strategy.stopping, strategy.policy), source=f"replay {strategy.name}")


@dataclass
class Ended:
    """One trial as it ended in a replay, with the compute spent so far and the study's answer at that point."""

    epochs_used: int  # epochs played by the whole replay when this trial ended
    seconds_used: float
    trial: int  # Optuna trial number
    cell: tuple
    seed: int
    status: str
    epochs: int  # epochs this trial played
    value: float  # its last value of the study metric
    stopped_reason: str
    incumbent: tuple | None  # the study's answer so far: the best completed cell (by the study metric), or while
    # none has completed, the best cell of the trials stopped early
    incumbent_truth: float


def _ledger_class():
    from ray.tune import Callback, Stopper

    class Ledger(Callback, Stopper):
        """Counts the compute of every reported epoch, stops the experiment at ``budget`` epochs, and records
        every trial's end with the study's answer at that point (the driver's order of events)."""

        def __init__(self, record: Record, metric: str, budget: int, epochs: int) -> None:
            self.record, self.metric, self.budget, self.epochs = record, metric, budget, epochs
            self.used, self.seconds, self.ended = 0, 0.0, []
            self.played: dict[str, int] = {}
            self.done: set[str] = set()
            self.best: tuple[tuple[bool, float], tuple] | None = None

        def __call__(self, trial_id: str, result: dict) -> bool:  # Stopper: never stops a single trial
            return False

        def stop_all(self) -> bool:
            return self.used >= self.budget

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            self.used += 1
            self.seconds += float(result.get("epoch_time_s") or 0.0)
            self.played[trial.trial_id] = self.played.get(trial.trial_id, 0) + 1
            if self.used >= self.budget:  # the experiment ends now: this trial ends with this result
                self._end(trial, error=False, last=result, cut=True)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._end(trial, error=False)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._end(trial, error=True)

        def _end(self, trial, error: bool, last: dict | None = None, cut: bool = False) -> None:
            last = last or trial.last_result or {}
            if not last.get("epoch") or trial.trial_id in self.done:
                return  # never reported (the budget ended the experiment before it started), or already ended
            self.done.add(trial.trial_id)
            status = trial_status(last, error, self.epochs)
            if cut and status == "pruned":
                status = "budget"  # cut short because the replay's budget ran out, not by ASHA
            value = last.get(self.metric)
            value = float(value) if isinstance(value, int | float) and math.isfinite(value) else math.nan
            cell = self.record.cell(trial.config)
            # The answer is what `ssl-study best` would give now: the best completed trial, or while none has
            # completed, the best of those stopped early (by their last value).
            if not math.isnan(value):
                done = status == "completed"
                key = (done, value)
                if self.best is None or key > self.best[0]:
                    self.best = (key, cell)
            incumbent = self.best[1] if self.best else None
            self.ended.append(Ended(
                self.used, self.seconds, int(trial.config.get("optuna_trial", -1)), cell,
                int(last.get("replayed_seed", -1)), status, self.played.get(trial.trial_id, 0), value,
                last.get("verdict_reason") if last.get("stopped") else "", incumbent,
                self.record.truth(incumbent) if incumbent else math.nan))

    return Ledger


# A replay is thousands of sub-second trials: no TensorBoard/CSV/JSON files per trial, no experiment-state snapshot
# every few seconds (about a third of the replay's time), no per-trial console output. Set for the replay only
# (runner.environment).
REPLAY_ENV = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "TUNE_GLOBAL_CHECKPOINT_S": "3600", "RAY_AIR_NEW_OUTPUT": "0"}


def replay(record: Record, strategy: Strategy, *, seed: int = 0, trials: int | None = None,
           budget: int | None = None, out: Path | None = None, optuna_storage=None) -> list[Ended]:
    """One replay of ``record`` under ``strategy``; needs a running Ray (``cluster.start_ray``).

    ``trials`` defaults to the grid's size (one trial per cell) for the grid and to as many as the budget
    allows otherwise; ``budget`` (epochs) defaults to what the grid costs: every cell to the end once.
    ``out``: keep the replay as a study directory there, with its results tables (``ssl-study results``);
    ``optuna_storage``: the Optuna storage the searcher uses (default: in memory).
    """
    import optuna

    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from study import runner
    from study.results.writer import ResultsWriter

    grid = len(record.runs) * record.epochs
    budget = budget or grid
    trials = trials or (len(record.runs) if strategy.sampler == "grid" else budget)
    with tempfile.TemporaryDirectory(prefix="ssl-study-replay-") as root:
        spec = replay_spec(record, strategy, trials, seed, Path(out).resolve().parent if out else Path(root))
        if out:
            spec = replace(spec, name=Path(out).name)
        played = record.with_detectors(spec.stopping).without_traces()
        run = runner.tune.with_parameters(replay_trial, record=played, policy=spec.stopping, seed=seed,
                                          pauses=strategy.scheduler == "hyperband")
        run = runner.tune.with_resources(run, {"CPU": 0.01})
        ledger = _ledger_class()(record, strategy.metric, budget, record.epochs)
        search = runner.build_search(spec, storage=optuna_storage or optuna.storages.InMemoryStorage())
        callbacks = [ledger, *([ResultsWriter(spec)] if out else [])]
        with runner.environment(REPLAY_ENV), _staging_removed():
            runner.build_tuner(spec, run=run, search=search, callbacks=callbacks, stop=ledger,
                               reuse_actors=True).fit()
        if out:
            runner.save_spec(spec)
    return ledger.ended


@contextlib.contextmanager
def _staging_removed():
    """Remove what the experiment staged under the Ray session's ``artifacts`` folder (Tune's experiment state
    before it is persisted): a replay's is 20 MB (600 trials), left until the Ray session's folder is deleted, so
    a race of 800 replays on one Ray left 16 GB in /tmp/ray. One experiment at a time per Ray here."""
    from ray.train.constants import _get_ray_train_session_dir  # Tune's own staging folder (private)

    staging = Path(_get_ray_train_session_dir())
    before = set(staging.iterdir()) if staging.is_dir() else set()
    try:
        yield
    finally:
        for folder in set(staging.iterdir()) - before if staging.is_dir() else ():
            shutil.rmtree(folder, ignore_errors=True)
