"""A study in object storage keeps two files on its driver's disk and copies them to its prefix: the Optuna
study (its default SQLite file or journal: neither works on an object store, which has no locks and no
appends) and the driver's Ray log.

Only the study driver opens the Optuna study (Tune's searcher runs in the driver), so a local file is enough
while it runs; :class:`Mirror` uploads it as trials start and end (at most every 30 s) and at the end, and
:func:`pull` brings it back before ``resume``, ``extend``, ``status`` or ``report`` on any machine. A driver
killed between two uploads loses at most 30 s of Optuna's bookkeeping: the trials it told since then
are told again from Tune's own state on ``resume`` (their Tune trials have ended) or closed by
``close_orphans``. Several drivers or a live dashboard on one study need a database server:
``search.storage: postgresql://...`` (cluster/README.md).
"""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path

from ray.tune import Callback

from data.atomic import atomic_path
from data.store import ObjectPath
from study.optuna_storage import file_path
from study.spec import StudySpec

EVERY_S = 30.0  # the Optuna file is uploaded at most this often while a study runs (a few MB for 1,000 trials)


def _pair(spec: StudySpec) -> tuple[Path, ObjectPath] | None:
    """The study's Optuna file on this machine and its copy in object storage, when it has one."""
    if not spec.remote or spec.search.storage not in (None, "journal"):
        return None
    local = file_path(spec.optuna_url)
    return local, spec.study_dir / local.name


def pull(spec: StudySpec) -> bool:
    """Bring the study's Optuna file from object storage when this machine has none or an older one; whether it
    did."""
    pair = _pair(spec)
    if pair is None:
        return False
    local, remote = pair
    if not remote.exists() or (local.exists() and local.stat().st_mtime >= remote.mtime()):
        return False
    remote.download(local)
    return True


def push(spec: StudySpec, *, log: bool = False) -> None:
    """Upload the study's Optuna file (a consistent copy: SQLite's backup of the live database) and, with
    ``log``, the driver's Ray log."""
    pair = _pair(spec)
    if pair is not None and pair[0].exists():
        local, remote = pair
        if local.suffix == ".db":
            with atomic_path(local.with_name(local.name + ".upload")) as copy:
                source, target = sqlite3.connect(local), sqlite3.connect(copy)
                try:
                    source.backup(target)
                finally:
                    source.close()
                    target.close()
                remote.upload(copy)
        else:  # a journal only grows by whole lines, appended by this process
            remote.upload(local)
    ray_log = spec.local_dir / "logs" / "ray.log"
    if log and spec.remote and ray_log.exists():
        (spec.study_dir / "logs" / "ray.log").upload(ray_log)


class Mirror(Callback):
    """Tune callback: :func:`push` after trials start or end (at most every ``every_s``; the first at once, so that a
    killed driver's study can be resumed from another machine) and at the end of the experiment."""

    def __init__(self, spec: StudySpec, every_s: float = EVERY_S) -> None:
        self.spec, self.every_s = spec, every_s
        self.due, self.pushed = False, -math.inf

    def _maybe_push(self) -> None:
        if self.due and time.monotonic() - self.pushed >= self.every_s:
            push(self.spec)
            self.due, self.pushed = False, time.monotonic()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:  # Optuna handed out a trial: a new row
        self.due = True
        self._maybe_push()

    on_trial_complete = on_trial_error = on_trial_start  # Optuna was told how it ended

    def on_step_end(self, iteration, trials, **info) -> None:
        self._maybe_push()

    def on_experiment_end(self, trials, **info) -> None:
        push(self.spec, log=True)
