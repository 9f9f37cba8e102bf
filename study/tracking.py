"""Experiment trackers: the study file's ``tracking:`` (study/spec.py ``Tracking``) as Tune callbacks, through Ray
Tune's own logger callbacks, subclassed for what they lack.

Every tracker gets one run per trial, named by its trial id: the trial's searched parameters as the run's
parameters; every epoch's metrics (the numeric columns of the ``epochs`` table, ``trainers.records.EpochRecord``,
those that are finite) at step = epoch; when the trial ends, its status and verdict (as the ``trials`` table has
them) and its instability events (the ``events`` table's rows) as a table.

- ``tensorboard: true``: ``TBXLoggerCallback``, writing to ``<study dir>/tensorboard/<trial_id>/`` (for a study in
  object storage, the driver's copy of the study folder, ``StudySpec.local_dir``): scalars, the parameters as
  hparams, ``status`` / ``verdict`` / ``events`` as text.
- ``mlflow: URI``: ``MLflowLoggerCallback`` (study/tracking_mlflow.py); an MLflow experiment named after the
  study, runs tagged ``trial_id`` (a resumed study finds its trials' runs), ``status`` / ``verdict`` ... as tags,
  the events as the artifact ``events.json`` (``{"columns": [...], "data": [[...], ...]}``).
- ``wandb: {project, mode}``: ``WandbLoggerCallback`` (study/tracking_wandb.py: a logging actor per trial on the
  driver's node); run id = trial id, group = study, the status and verdict in the run's summary, the events as the
  table ``events``. Offline runs are written to ``<study dir>/wandb/offline-run-*`` (``wandb sync`` uploads them).

Credentials come from the environment only (MLFLOW_TRACKING_TOKEN / _USERNAME / _PASSWORD, WANDB_API_KEY): the
callbacks hold none, so Tune's pickle of the experiment does not either. :func:`check` refuses at launch, in one
line naming the key, a tracker that cannot work; a tracker that fails while the study runs is a warning on the
terminal and the trials go on.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

from ray.tune import Callback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

from search_spaces import flatten
from study.console import err
from study.errors import SpecError
from study.spec import StudySpec
from study.status import trial_status
from trainers.events import Event
from trainers.records import EpochRecord

EVENT_COLUMNS = tuple(f.name for f in fields(Event))  # step, epoch, kind, layer, magnitude
INSTALL = "pip install 'ssl-study[track]'"


def callbacks(spec: StudySpec) -> list[Callback]:
    """A study's per-trial loggers: Tune's own result files in each trial's Tune folder (``result.json``,
    ``progress.csv``), then the trackers ``spec.tracking`` names. study/runner.py turns Tune's automatic loggers off,
    so this list is all a trial writes (Tune would otherwise add TensorBoard files whatever the study file says)."""
    t = spec.tracking
    found = [CSVLoggerCallback(), JsonLoggerCallback(), *([TensorBoard(spec)] if t.tensorboard else [])]
    # MLflow's and W&B's callbacks are in modules of their own: importing mlflow or wandb costs seconds of CPU that
    # a study without them, and every command that imports the runner, should not pay.
    if t.mlflow:
        from study.tracking_mlflow import MLflow

        found.append(MLflow(spec))
    if t.wandb:
        from study.tracking_wandb import Wandb

        found.append(Wandb(spec))
    return found


def where(spec: StudySpec) -> list[str]:
    """Where each tracker of the study puts its runs, one line each (``launch --dry-run``, the summary)."""
    t, lines = spec.tracking, []
    if t.tensorboard:
        lines.append(f"TensorBoard: tensorboard --logdir {spec.local_dir / 'tensorboard'}")
    if t.mlflow:
        lines.append(f"MLflow:      experiment {spec.name} at {t.mlflow}")
    if t.wandb:
        place = f"offline runs in {spec.local_dir / 'wandb'}" if t.wandb.mode == "offline" else "online"
        lines.append(f"W&B:         project {t.wandb.project or spec.name}, {place}")
    return lines


def check(spec: StudySpec) -> None:
    """Refuse, in one line naming its key, a tracker that cannot work (its package missing, an MLflow server that
    does not answer, W&B online without an API key): before Ray starts."""
    t, src = spec.tracking, spec.source
    if t.tensorboard:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise SpecError(f"{src}: tracking.tensorboard: needs the tensorboardX package (pip install "
                            f"'ray[tune]')") from None
    if t.mlflow:
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise SpecError(f"{src}: tracking.mlflow: needs the mlflow-skinny package ({INSTALL})") from None
        bounded_retries()
        try:
            MlflowClient(t.mlflow).search_experiments(max_results=1)
        except Exception as e:
            raise SpecError(f"{src}: tracking.mlflow: cannot reach {t.mlflow}: {_line(_root(e))}") from None
    if t.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise SpecError(f"{src}: tracking.wandb: needs the wandb package ({INSTALL})") from None
        if t.wandb.mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise SpecError(f"{src}: tracking.wandb: mode online needs WANDB_API_KEY in the environment (or "
                            f"mode: offline, then `wandb sync`)")


def bounded_retries() -> None:
    """The driver's MLflow requests give up after 2 retries and 10 s instead of MLflow's 7 retries (minutes of
    backoff) and 120 s: an unreachable server is an error at launch, or a warning mid-study, within seconds rather
    than a study stalled in Tune's event loop. What the environment sets wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _root(error: BaseException) -> BaseException:
    """The innermost cause: what a refused connection is under the client's and HTTP library's wrappers."""
    while (inner := error.__cause__ or error.__context__) is not None:
        error = inner
    return error


def _line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


@dataclass
class _Seen:
    """What a tracker keeps of a trial to close its run: its last epoch, its first verdict, its events."""

    last: EpochRecord | None = None
    flagged: EpochRecord | None = None
    events: dict[tuple, dict] = field(default_factory=dict)  # (step, kind, layer) -> event


class _Tracker:
    """What every tracker does alike (mixed in before Tune's logger callback): which numbers a run gets, and where
    its work runs. Each hook runs in the tracker's own thread, in order: a slow or unreachable tracker then holds back
    neither Tune's event loop nor the trials (Ray 2.60 even deadlocks a trial whose last report waits behind a slow
    event loop when its function returns). A hook that fails is a warning, never a failed trial or study."""

    key = ""  # the study-file key, named in warnings
    pause_s = 60.0  # after a failure the tracker skips what comes for this long (a server that is down costs no
    # retries per epoch), then tries again

    def _track(self, spec: StudySpec) -> None:
        self.study, self.epochs = spec.name, spec.train_config().epochs
        self.params = [p.name for p in flatten(spec.params)]
        self.seen: dict[str, _Seen] = {}
        self.warned: set[str] = set()
        self.off = False  # set up failed: the tracker does nothing
        self.down_until = 0.0
        self._thread: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment (tuner.pkl): not the thread
        return {**self.__dict__, "_thread": None}

    def _later(self, hook, *args, **kwargs) -> None:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix=self.key)
        self._thread.submit(self._guard, hook, *args, **kwargs)

    def _guard(self, hook, *args, **kwargs) -> bool:
        if self.off or time.monotonic() < self.down_until:
            return False
        try:
            hook(*args, **kwargs)
            return True
        except Exception as e:
            self.down_until = time.monotonic() + self.pause_s
            line = f"warning: {self.key}: {_line(e)} (the trials go on; it is tried again in {self.pause_s:.0f} s)"
            if line not in self.warned:  # a tracker that stays down says so once
                self.warned.add(line)
                print(line, file=err(), flush=True)
            return False

    def _set_up(self, hook, *args, **kwargs) -> None:
        self.off = not self._guard(hook, *args, **kwargs)

    def setup(self, *args, **kwargs):
        self._later(self._set_up, super().setup, *args, **kwargs)

    def on_trial_start(self, *args, **kwargs):
        self._later(super().on_trial_start, *args, **kwargs)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._later(super().on_trial_result, iteration, trials, trial, dict(result), **info)  # a copy: Tune's goes on

    def on_trial_complete(self, *args, **kwargs):
        self._later(super().on_trial_complete, *args, **kwargs)

    def on_trial_error(self, *args, **kwargs):
        self._later(super().on_trial_error, *args, **kwargs)

    def on_experiment_end(self, *args, **kwargs):
        self._later(super().on_experiment_end, *args, **kwargs)
        self._thread.shutdown(wait=True)  # what the tracker still has to send, before the study returns
        self._thread = None

    def params_of(self, trial) -> dict:
        return {name: trial.config[name] for name in self.params if name in trial.config}

    def note(self, trial, result: dict) -> tuple[int, dict[str, float]]:
        """Keep what the end of the trial's run needs of ``result``; its epoch and its finite metrics."""
        record = EpochRecord.from_report(result)
        seen = self.seen.setdefault(trial.trial_id, _Seen())
        if seen.last and record.epoch <= seen.last.epoch:  # restarted from a checkpoint: its later epochs again
            seen.events = {k: e for k, e in seen.events.items() if e["epoch"] < record.epoch}
            seen.flagged = seen.flagged if seen.flagged and seen.flagged.epoch < record.epoch else None
        seen.last = record
        seen.flagged = seen.flagged or (record if record.verdict else None)
        for e in result.get("events") or []:
            event = {c: e.get(c) for c in EVENT_COLUMNS}
            seen.events[(event["step"], event["kind"], event["layer"])] = event
        values = {name: float(getattr(record, name)) for name in EpochRecord.metrics()}
        return record.epoch, {k: v for k, v in values.items() if math.isfinite(v)}

    def outcome(self, trial, failed: bool) -> dict:
        """The trial's status and, if the policy flagged it, its verdict: as the ``trials`` table has them."""
        seen = self.seen.get(trial.trial_id, _Seen())
        last = seen.last and {"epoch": seen.last.epoch, "stopped": seen.last.stopped, "verdict": seen.last.verdict}
        out = {"status": trial_status(last or trial.last_result, failed, self.epochs)}
        if f := seen.flagged:
            out.update(verdict=f.verdict, verdict_reason=f.verdict_reason or "", verdict_epoch=f.epoch)
        return out

    def events_of(self, trial) -> list[dict]:
        events = self.seen.get(trial.trial_id, _Seen()).events
        return [events[k] for k in sorted(events, key=lambda k: (k[0], k[1], str(k[2])))]


class TensorBoard(_Tracker, TBXLoggerCallback):
    """``tracking.tensorboard``: Tune's TensorBoardX logger, in ``<study dir>/tensorboard/<trial_id>/`` rather than
    Tune's trial folders, the epochs' metrics under their own names at step = epoch."""

    key = "tracking.tensorboard"

    def __init__(self, spec: StudySpec) -> None:
        super().__init__()
        self._track(spec)
        self.root = spec.local_dir / "tensorboard"

    def log_trial_start(self, trial) -> None:
        if trial in self._trial_writer:
            self._trial_writer[trial].close()
        self._trial_writer[trial] = self._summary_writer_cls(str(self.root / trial.trial_id), flush_secs=30)
        self._trial_result[trial] = {}

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if trial not in self._trial_writer:
            self.log_trial_start(trial)
        epoch, metrics = self.note(trial, result)
        writer = self._trial_writer[trial]
        for name, value in metrics.items():
            writer.add_scalar(name, value, global_step=epoch)
        self._trial_result[trial] = metrics  # what Tune's hparams summary holds at the end
        writer.flush()

    def log_trial_end(self, trial, failed: bool = False) -> None:
        writer = self._trial_writer.get(trial)
        if writer is not None:
            for name, value in self.outcome(trial, failed).items():
                writer.add_text(name, str(value))
            rows = [" | ".join(map(str, (e[c] for c in EVENT_COLUMNS))) for e in self.events_of(trial)]
            header = " | ".join(EVENT_COLUMNS)
            writer.add_text("events", "\n".join([header, " | ".join(["---"] * len(EVENT_COLUMNS)), *rows]))
        super().log_trial_end(trial, failed)  # the parameters as hparams against the last metrics; closes
