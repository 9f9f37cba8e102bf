"""What every tracker of study/tracking/ does alike: which numbers a trial's run gets, and the thread its work runs
in (a slow or failing tracker is a warning, never a failed trial)."""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

from search_spaces import flatten
from study.console import err
from study.spec import StudySpec
from study.status import trial_status
from trainers.events import Event
from trainers.records import EpochRecord

EVENT_COLUMNS = tuple(f.name for f in fields(Event))  # step, epoch, kind, layer, magnitude


def bounded_retries() -> None:
    """The driver's MLflow requests give up after 2 retries and 10 s instead of MLflow's 7 retries (minutes of
    backoff) and 120 s: an unreachable server is an error at launch, or a warning mid-study, within seconds rather
    than a study stalled in Tune's event loop. What the environment sets wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def innermost(error: BaseException) -> BaseException:
    """The innermost cause: what a refused connection is under the client's and HTTP library's wrappers."""
    while (inner := error.__cause__ or error.__context__) is not None:
        error = inner
    return error


def one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


@dataclass
class _Seen:
    """What a tracker keeps of a trial to close its run: its last epoch, its first verdict, its events."""

    last: EpochRecord | None = None
    flagged: EpochRecord | None = None
    events: dict[tuple, dict] = field(default_factory=dict)  # (step, kind, layer) -> event


class Tracker:
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
            line = f"warning: {self.key}: {one_line(e)} (the trials go on; it is tried again in {self.pause_s:.0f} s)"
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
