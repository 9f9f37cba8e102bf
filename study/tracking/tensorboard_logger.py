"""``tracking.tensorboard`` (study/tracking/): Tune's TensorBoardX logger."""

from __future__ import annotations

from ray.tune.logger import TBXLoggerCallback

from study.spec import StudySpec
from study.tracking.base import EVENT_COLUMNS, Tracker


class TensorBoard(Tracker, TBXLoggerCallback):
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
