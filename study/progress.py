"""One progress line per change while a study runs: trials by status, the best metric so far, elapsed time."""

from __future__ import annotations

import math
import sys
import time
from collections import Counter

from ray.tune import Callback

from study.spec import StudySpec
from study.status import trial_status


class ProgressLine(Callback):
    """Prints e.g. ``[  4m05s] fmnist: 2 running, 1 completed, 1 pruned | best knn_top1 0.612 (a1b2c3d4)``."""

    def __init__(self, spec: StudySpec, stream=sys.stdout) -> None:
        self.name, self.metric, self.mode = spec.name, spec.search.metric, spec.search.mode
        self.epochs, self.total = spec.train_config().epochs, spec.search.num_samples
        self.stream = stream
        self.start = time.monotonic()
        self.status: dict[str, str] = {}
        self.epoch: dict[str, int] = {}
        self.best: tuple[float, str] | None = None

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment; the stream is not needed
        return {**self.__dict__, "stream": None}

    def _print(self) -> None:
        running = ", ".join(f"{t} epoch {self.epoch.get(t, 0)}/{self.epochs}"
                            for t, s in self.status.items() if s == "running")
        parts = [f"{n} {s}" + (f" ({running})" if s == "running" else "")
                 for s, n in Counter(self.status.values()).most_common()]
        best = (f" | best {self.metric} {self.best[0]:.4g} ({self.best[1]})" if self.best else "")
        elapsed = time.monotonic() - self.start
        line = (f"[{int(elapsed // 60):4d}m{int(elapsed % 60):02d}s] {self.name}: {', '.join(parts)} "
                f"of {self.total}{best}")
        print(line, file=self.stream or sys.stdout, flush=True)

    def _better(self, value) -> bool:
        if not isinstance(value, int | float) or not math.isfinite(value):
            return False
        return self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.status[trial.trial_id] = "running"
        self.epoch[trial.trial_id] = 0
        self._print()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.status[trial.trial_id] = "running"
        self.epoch[trial.trial_id] = result.get("epoch", 0)
        if self._better(result.get(self.metric)):
            self.best = (float(result[self.metric]), trial.trial_id)
        self._print()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.status[trial.trial_id] = trial_status(trial.last_result, False, self.epochs)
        self._print()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.status[trial.trial_id] = "failed"
        self._print()
