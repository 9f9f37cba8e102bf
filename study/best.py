"""The best trial of a study: one rule for ``ssl-study best`` / ``status``, the report and the replay.

The best trial is the one with the best finite study metric among the completed trials, or, while none has
completed, among all trials that reported it (a study stopped early still has an answer).
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def number(value) -> float:
    """``value`` as a float; NaN for anything that is not a real number (None, a bool, a string)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def finite(value) -> bool:
    """Whether ``value`` is a finite real number (bools are not numbers here)."""
    return math.isfinite(number(value))


def ranked(rows: Iterable[dict], metric: str, mode: str, *, completed_first: bool = True) -> list[dict]:
    """The rows with a finite ``metric``, best first (``mode`` "max" or "min"; ties keep the rows' order); with
    ``completed_first``, only the rows whose ``status`` is "completed" when there is one."""
    scored = [r for r in rows if finite(r.get(metric))]
    if completed_first:
        scored = [r for r in scored if r.get("status") == "completed"] or scored
    return sorted(scored, key=lambda r: number(r[metric]), reverse=mode == "max")  # stable, also reversed


def best_trial(rows: Iterable[dict], metric: str, mode: str, *, completed_first: bool = True) -> dict | None:
    """The row with the best finite ``metric`` (:func:`ranked`'s first); None when no row has a finite value."""
    return next(iter(ranked(rows, metric, mode, completed_first=completed_first)), None)
