"""The study's results tables, read once for every figure and the page."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from search_spaces import Param, flatten
from study import results
from study.best import best_trial, number
from study.spec import SpecError, StudySpec


@dataclass
class StudyData:
    """One study's resolved spec and its results tables, as lists of rows (dicts)."""

    spec: StudySpec
    study_dir: Path
    trials: list[dict]
    epochs: list[dict]
    events: list[dict]
    params: list[Param]  # the searched parameters that are columns of the trials table
    evaluations: list[dict] = field(default_factory=list)  # ssl-study evaluate's rows (study/evaluate.py)

    @property
    def metric(self) -> str:
        return self.spec.search.metric

    @property
    def maximize(self) -> bool:
        return self.spec.search.mode == "max"

    def metric_value(self, trial: dict) -> float:
        return number(trial.get(self.metric))

    def best(self, trials: list[dict]) -> dict | None:
        """The one of ``trials`` with the best finite metric, whatever its status; None when none has one."""
        return best_trial(trials, self.metric, self.spec.search.mode, completed_first=False)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def load(study_dir: Path, spec: StudySpec) -> StudyData:
    """The tables under ``study_dir/results``; a SpecError when there is no trial to report or a table is not
    readable."""
    trials_file = study_dir / "results" / "trials.parquet"
    if not trials_file.exists():
        raise SpecError(f"{study_dir}: no results to report yet ({trials_file} does not exist)")
    trials, epochs, events = (_rows(study_dir, name) for name in ("trials", "epochs", "events"))
    if not trials:
        raise SpecError(f"{trials_file}: no trials to report yet (the table is empty)")
    params = [p for p in flatten(spec.params) if p.name in trials[0]]
    return StudyData(spec, study_dir, trials, epochs, events, params, _rows(study_dir, "evaluations"))


def _rows(study_dir: Path, name: str) -> list[dict]:
    try:
        return results.open(study_dir).table(name).to_pylist()  # the compacted file and any parts
    except FileNotFoundError:  # epochs and events: no trial has reported an epoch yet; no evaluation yet
        return []
    except (pa.ArrowException, OSError) as e:  # a truncated, foreign or unreadable file
        raise SpecError(f"{study_dir / 'results' / f'{name}.parquet'}: not a readable Parquet table ({e})") from None
