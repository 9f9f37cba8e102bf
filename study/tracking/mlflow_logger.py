"""``tracking.mlflow`` (study/tracking/): Tune's MLflow logger; imported only by a study that names it."""

from __future__ import annotations

import time

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from ray.air.integrations.mlflow import MLflowLoggerCallback

from study.spec import StudySpec
from study.tracking.base import EVENT_COLUMNS, Tracker, bounded_retries


class MLflow(Tracker, MLflowLoggerCallback):
    """``tracking.mlflow``: Tune's MLflow logger (its setup makes the study's experiment), with the metrics of an
    epoch in one request, runs found again by trial id, and the trial's end as tags and a table."""

    key = "tracking.mlflow"

    def __init__(self, spec: StudySpec) -> None:
        super().__init__(spec.tracking.mlflow, experiment_name=spec.name)
        self._track(spec)

    def setup(self, *args, **kwargs):
        bounded_retries()
        super().setup(*args, **kwargs)

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def _run_of(self, trial) -> str:
        """The trial's run: the one a study resumed in a new driver made before, or a new one."""
        experiment = self.mlflow_util.experiment_id
        found = self.client.search_runs([experiment], f"tags.trial_id = '{trial.trial_id}'", max_results=1)
        if found:
            return found[0].info.run_id
        tags = {"trial_id": trial.trial_id, "study": self.study}
        return self.client.create_run(experiment, run_name=trial.trial_id, tags=tags).info.run_id

    def log_trial_start(self, trial) -> None:
        if trial not in self._trial_runs:
            self._trial_runs[trial] = self._run_of(trial)
        params = [Param(k, str(v)) for k, v in self.params_of(trial).items()]
        self.client.log_batch(self._trial_runs[trial], params=params)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if trial not in self._trial_runs:
            self.log_trial_start(trial)
        epoch, metrics = self.note(trial, result)
        now = int(time.time() * 1000)
        self.client.log_batch(self._trial_runs[trial], metrics=[Metric(k, v, now, epoch) for k, v in metrics.items()])

    def log_trial_end(self, trial, failed: bool = False) -> None:
        run, client = self._trial_runs[trial], self.client
        client.log_batch(run, tags=[RunTag(k, str(v)) for k, v in self.outcome(trial, failed).items()])
        # pandas' "split" layout, as W&B's table file (log_dict replaces a retried trial's, log_table would append)
        rows = [[e[c] for c in EVENT_COLUMNS] for e in self.events_of(trial)]
        client.log_dict(run, {"columns": list(EVENT_COLUMNS), "data": rows}, "events.json")
        client.set_terminated(run, "FAILED" if failed else "FINISHED")
