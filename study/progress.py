"""The progress a running study shows (a Tune callback): one line per change (trials by status, running trials'
epochs, the best metric so far, elapsed time and an estimate of the time left) and one line per failed trial, on
the terminal (study/console.py) whatever else goes to the log."""

from __future__ import annotations

import math
import time
from collections import Counter

from ray.tune import Callback

from study.console import err, say
from study.spec import StudySpec
from study.status import failure, trial_status


def clock(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class ProgressLine(Callback):
    """Prints e.g. ``[   4m05s] fmnist: 2 running (a1b2c3d4 epoch 2/3, ...), 1 completed, 1 pruned of 4 | best
    knn_top1 0.612 (a1b2c3d4) | eta 3m10s`` on every change, and for a failed trial ``trial ID failed: ERROR (full
    log: PATH)`` on stderr.

    The estimate is the mean time per reported epoch so far (trial start-up included) times the epochs left
    (every epoch of the trials not started yet, as if none were pruned) over the trials that can run at once.
    """

    def __init__(self, spec: StudySpec, concurrency: int = 1) -> None:
        self.name, self.metric, self.mode = spec.name, spec.search.metric, spec.search.mode
        self.epochs, self.total = spec.train_config().epochs, spec.search.num_samples
        self.concurrency, self.logs = concurrency, spec.study_dir / "logs"
        self.start = time.monotonic()
        self.status: dict[str, str] = {}
        self.epoch: dict[str, int] = {}
        self.spent: dict[str, tuple[float, int]] = {}  # trial -> (seconds, epochs) at its last report
        self.best: tuple[float, str] | None = None

    def __setstate__(self, state: dict) -> None:  # Tune restores its callbacks from the experiment's pickle,
        # which for a study interrupted under an older ssl-study lacks the newer fields
        self.__dict__.update({"concurrency": 1, "logs": None, "spent": {}, **state})

    def _eta(self) -> str:
        epochs = sum(e for _, e in self.spent.values())
        if not epochs:
            return "eta ?"
        running = [t for t, s in self.status.items() if s == "running"]
        waiting = max(0, self.total - len(self.status))
        left = sum(self.epochs - self.epoch.get(t, 0) for t in running) + waiting * self.epochs
        at_once = max(1, min(self.concurrency, len(running) + waiting))
        per_epoch = sum(s for s, _ in self.spent.values()) / epochs
        return f"eta {clock(per_epoch * left / at_once)}"

    def _print(self) -> None:
        running = ", ".join(f"{t} epoch {self.epoch.get(t, 0)}/{self.epochs}"
                            for t, s in self.status.items() if s == "running")
        parts = [f"{n} {s}" + (f" ({running})" if s == "running" else "")
                 for s, n in Counter(self.status.values()).most_common()]
        best = (f" | best {self.metric} {self.best[0]:.4g} ({self.best[1]})" if self.best else "")
        say(f"[{clock(time.monotonic() - self.start):>8}] {self.name}: {', '.join(parts)} of {self.total}{best} | "
            f"{self._eta()}")

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
        self.spent[trial.trial_id] = (float(result.get("time_total_s") or 0.0), int(result.get("epoch") or 0))
        if self._better(result.get(self.metric)):
            self.best = (float(result[self.metric]), trial.trial_id)
        self._print()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.status[trial.trial_id] = trial_status(trial.last_result, False, self.epochs)
        self._print()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.status[trial.trial_id] = "failed"
        print(f"trial {trial.trial_id} failed: {failure(trial, self.logs)}", file=err(), flush=True)
        self._print()
