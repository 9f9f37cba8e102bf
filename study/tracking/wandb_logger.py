"""``tracking.wandb`` (study/tracking/): Tune's Weights & Biases logger; imported only by a study that names
it."""

from __future__ import annotations

import os

from ray.air.integrations.wandb import WandbLoggerCallback, _QueueItem, _WandbLoggingActor

from study.spec import StudySpec
from study.tracking.base import EVENT_COLUMNS, Tracker


class _WandbRun(_WandbLoggingActor):
    """One trial's W&B run in its own process (W&B wants a process per run), fed by Tune's queue: an epoch's
    metrics at step = epoch, then the trial's end in the run's summary and its events as a table."""

    def run(self):
        os.environ["WANDB_START_METHOD"] = "thread"  # as Tune's actor: no fork inside a Ray worker
        run = self._wandb.init(*self.args, **self.kwargs)
        while True:
            kind, item = self.queue.get()
            if kind == _QueueItem.END:
                break
            if "metrics" in item:
                run.log(item["metrics"], step=item["step"])
            else:
                run.summary.update(item["outcome"])
                rows = [[e[c] for c in EVENT_COLUMNS] for e in item["events"]]
                run.log({"events": self._wandb.Table(columns=list(EVENT_COLUMNS), data=rows)})
        run.finish()


class Wandb(Tracker, WandbLoggerCallback):
    """``tracking.wandb``: Tune's W&B logger with the run above; offline needs no login."""

    key = "tracking.wandb"
    _logger_actor_cls = _WandbRun

    def __init__(self, spec: StudySpec) -> None:
        w = spec.tracking.wandb
        # wandb.init's arguments: no system metrics, console capture or code and git metadata (a process each,
        # for numbers the study has); resume: a resumed study goes on with the trial's run.
        super().__init__(project=w.project or spec.name, group=spec.name, mode=w.mode, dir=str(spec.local_dir),
                         resume="allow", settings={"x_disable_stats": True, "x_disable_meta": True,
                                                   "console": "off", "save_code": False})
        self._track(spec)

    def setup(self, *args, **kwargs):
        if self.kwargs["mode"] == "online":  # Tune's setup logs in (WANDB_API_KEY): offline has nothing to log in to
            super().setup(*args, **kwargs)

    def log_trial_start(self, trial) -> None:
        trial.init_local_path()  # the actor starts in the trial's Tune folder
        self._start_logging_actor(trial, [], id=trial.trial_id, name=trial.trial_id, project=self.project,
                                  group=self.group, config=self.params_of(trial), **self.kwargs)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if trial not in self._trial_logging_actors:
            self.log_trial_start(trial)
        epoch, metrics = self.note(trial, result)
        self._trial_queues[trial].put((_QueueItem.RESULT, {"step": epoch, "metrics": metrics}))

    def on_experiment_end(self, trials, **info):
        self._later(self._stop_open_runs)  # (before Tune's wait for the runs to finish)
        super().on_experiment_end(trials, **info)

    def _stop_open_runs(self) -> None:
        """End the runs of trials that did not end (an interrupted study; ``resume`` goes on with them): Tune would
        otherwise wait for them for its upload timeout, half an hour."""
        for trial in list(self._trial_queues):
            self._signal_logging_actor_stop(trial)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        if trial in self._trial_queues:
            item = {"outcome": self.outcome(trial, failed), "events": self.events_of(trial)}
            self._trial_queues[trial].put((_QueueItem.RESULT, item))
            super().log_trial_end(trial, failed)  # the end of the queue; the actor finishes the run
