"""The heat map's grid: which two parameters span it and which cell each trial falls in (levels of a choice,
distinct values, or bins of a wide numeric range)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from search_spaces import Param
from study.report.data import StudyData
from study.report.style import num
from study.spec import SpecError

MAX_LEVELS = 8  # a numeric axis with more distinct values than this is binned
CONTINUOUS_LEVELS = 4  # the same for log / uniform parameters
BINS = 6


@dataclass
class Axis:
    """How one parameter's values fall into the levels of a heat-map axis."""

    name: str
    labels: list[str]
    values: list  # distinct levels (None when binned)
    edges: list[float] | None = None  # bin edges (increasing), when binned
    log: bool = False

    def index(self, value) -> int | None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if self.edges is None:
            return self.values.index(value) if value in self.values else None
        for i in range(len(self.edges) - 1):
            if value <= self.edges[i + 1] or i == len(self.edges) - 2:
                return i
        return None


def make_axis(name: str, param: Param | None, values: list) -> Axis:
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if param is not None and param.kind == "choice":
        levels = [v for v in param.args if v in present] + sorted({v for v in present if v not in param.args},
                                                                    key=str)
        return Axis(name, [num(v) for v in levels], levels)
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in present)
    distinct = sorted(set(present)) if numeric else sorted(set(present), key=str)
    continuous = param is not None and param.kind in ("log", "uniform", "log1m")
    if not numeric or len(distinct) <= (CONTINUOUS_LEVELS if continuous else MAX_LEVELS):
        return Axis(name, [num(v) for v in distinct], distinct)
    log = param is not None and param.kind in ("log", "log1m")
    if param is not None and param.kind != "choice":
        low, high = (float(a) for a in param.args)
    else:
        low, high = float(min(distinct)), float(max(distinct))
    low, high = min(low, min(distinct)), max(high, max(distinct))
    if log and low > 0:
        edges = [low * (high / low) ** (i / BINS) for i in range(BINS + 1)]
    else:
        log = False
        edges = [low + (high - low) * i / BINS for i in range(BINS + 1)]
    labels = [f"{a:.2g}–{b:.2g}" for a, b in itertools.pairwise(edges)]
    return Axis(name, labels, [], edges, log)


def scatter_param(data: StudyData, names: tuple[str, ...]) -> Param | None:
    """The one parameter of ``names`` when it is a searched range (log, uniform, int, log1m): its figure is then a
    scatter over its own axis, not a grid of levels; None otherwise."""
    param = data.param(names[0]) if len(names) == 1 else None
    return param if param is not None and param.kind != "choice" else None


def heatmap_params(data: StudyData, override: tuple[str, str] | None = None) -> tuple[str, ...]:
    """The heat map's axes: ``override``, else base_lr x batch_size, else the two searched parameters with the
    most distinct values (one or none when the study searched fewer)."""
    names = [p.name for p in data.params]
    if override is not None:
        columns = list(data.trials[0]) if data.trials else names
        missing = [n for n in override if n not in columns]
        if missing:  # any column makes an axis; the searched parameters are the ones meant, so they come first
            verb = "is not a column" if len(missing) == 1 else "are not columns"
            others = [c for c in columns if c not in names]
            raise SpecError(f"--params: {' and '.join(missing)} {verb} of the trials table; accepted: the searched "
                            f"parameters ({', '.join(names) or 'none'}) or another column ({', '.join(others)})")
        if override[0] == override[1]:
            raise SpecError(f"--params: give two different parameters, got {override[0]} twice")
        return tuple(override)
    if "base_lr" in names and "batch_size" in names:
        return ("base_lr", "batch_size")

    def distinct(name: str) -> int:
        return len({t.get(name) for t in data.trials if t.get(name) is not None})

    ranked = sorted(names, key=lambda n: -distinct(n))  # stable: ties keep the study file's order
    return tuple(ranked[:2])


def cells(data: StudyData, axes: list[Axis]) -> dict[tuple, list[dict]]:
    """The trials of each cell, keyed by the level index on each axis; trials off the grid are left out."""
    out: dict[tuple, list[dict]] = {}
    for t in data.trials:
        key = tuple(a.index(t.get(a.name)) for a in axes)
        if None not in key:
            out.setdefault(key, []).append(t)
    return out
