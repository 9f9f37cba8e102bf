"""Experiment trackers: the study file's ``tracking:`` (study/spec.py ``Tracking``) as Tune callbacks, through Ray
Tune's own logger callbacks, subclassed for what they lack (what they share: study/tracking/base.py; TensorBoard in
tensorboard_logger.py, MLflow in mlflow_logger.py, W&B in wandb_logger.py).

Every tracker gets one run per trial, named by its trial id: the trial's searched parameters as the run's
parameters; every epoch's metrics (the numeric columns of the ``epochs`` table, ``trainers.records.EpochRecord``,
those that are finite) at step = epoch; when the trial ends, its status and verdict (as the ``trials`` table has
them) and its instability events (the ``events`` table's rows) as a table.

- ``tensorboard: true``: ``TBXLoggerCallback``, writing to ``<study dir>/tensorboard/<trial_id>/`` (for a study in
  object storage, the driver's copy of the study folder, ``StudySpec.local_dir``): scalars, the parameters as
  hparams, ``status`` / ``verdict`` / ``events`` as text.
- ``mlflow: URI``: ``MLflowLoggerCallback`` (study/tracking/mlflow_logger.py); an MLflow experiment named after the
  study, runs tagged ``trial_id`` (a resumed study finds its trials' runs), ``status`` / ``verdict`` ... as tags,
  the events as the artifact ``events.json`` (``{"columns": [...], "data": [[...], ...]}``).
- ``wandb: {project, mode}``: ``WandbLoggerCallback`` (study/tracking/wandb_logger.py: a logging actor per trial on the
  driver's node); run id = trial id, group = study, the status and verdict in the run's summary, the events as the
  table ``events``. Offline runs are written to ``<study dir>/wandb/offline-run-*`` (``wandb sync`` uploads them).

Credentials come from the environment only (MLFLOW_TRACKING_TOKEN / _USERNAME / _PASSWORD, WANDB_API_KEY): the
callbacks hold none, so Tune's pickle of the experiment does not either. :func:`check` refuses at launch, in one
line naming the key, a tracker that cannot work; a tracker that fails while the study runs is a warning on the
terminal and the trials go on.
"""

from __future__ import annotations

import os

from ray.tune import Callback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from study.errors import SpecError
from study.spec import StudySpec
from study.tracking.base import EVENT_COLUMNS, bounded_retries, innermost, one_line
from study.tracking.tensorboard_logger import TensorBoard

__all__ = ["EVENT_COLUMNS", "TensorBoard", "callbacks", "check", "where"]
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
        from study.tracking.mlflow_logger import MLflow

        found.append(MLflow(spec))
    if t.wandb:
        from study.tracking.wandb_logger import Wandb

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
            raise SpecError(f"{src}: tracking.mlflow: cannot reach {t.mlflow}: {one_line(innermost(e))}") from None
    if t.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise SpecError(f"{src}: tracking.wandb: needs the wandb package ({INSTALL})") from None
        if t.wandb.mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise SpecError(f"{src}: tracking.wandb: mode online needs WANDB_API_KEY in the environment (or "
                            f"mode: offline, then `wandb sync`)")
