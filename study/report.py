"""``ssl-study report NAME``: PNG figures and one HTML page that sums up a study.

Under ``<study_dir>/report/`` (or ``--out DIR``), each file written to a temporary name then renamed:

- ``curves.png``: kNN top-1, training loss and dense-kNN minimum per epoch, one line per trial coloured by
  status (dashed: stopped by the instability policy), instability events marked at their epoch;
- ``events.png``: every instability event by training step, one row per trial (the paper's "spike precedes
  the dip" view);
- ``heatmap.png``: the final study metric over two parameters, as the paper's batch x lr table (``--params A B``;
  default base_lr x batch_size, else the two searched parameters with the most distinct values);
- ``status.png``: trials by status;
- ``importance.png``: parameter importance from the Optuna storage (PED-ANOVA);
- ``parallel.png``: parallel coordinates over the searched parameters and the metric;
- ``report.html``: a summary table of the trials and the figures.

Figures are drawn with matplotlib's object API (``matplotlib.figure.Figure``, saved through the Agg canvas): no
pyplot, no global backend switch, nothing shown on screen.
"""

from __future__ import annotations

import datetime
import html
import itertools
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from search_spaces import Param, flatten
from study.spec import SpecError, StudySpec
from study.status import STATUSES

FIGURES = ("curves", "events", "heatmap", "status", "importance", "parallel")
POLICY_STOPS = ("diverged", "collapsed", "unstable")
STATUS_COLORS = {"completed": "#2ca02c", "pruned": "#8c8c8c", "diverged": "#d62728", "collapsed": "#9467bd",
                 "unstable": "#ff7f0e", "failed": "#000000", "running": "#1f77b4", "pending": "#c7c7c7"}
# Marker shape per event kind (trainers/signals.py EVENT_KINDS); the face takes the trial's status colour.
EVENT_MARKERS = {"grad_spike": "^", "loss_spike": "v", "nonfinite": "X", "knn_dip": "o", "collapse": "s"}
EVENT_OFFSETS = {"grad_spike": -0.12, "loss_spike": -0.06, "nonfinite": 0.0, "knn_dip": 0.06, "collapse": 0.12}
METRIC_LABELS = {"knn_top1": "kNN top-1 (%)", "loss": "training loss"}
MAX_LABELLED = 12  # trials whose id labels their kNN curve
MAX_LEVELS = 8  # a numeric axis with more distinct values than this is binned
CONTINUOUS_LEVELS = 4  # the same for log / uniform parameters
BINS = 6


# ------------------------------------------------------------------------------------------------- the data


@dataclass
class StudyData:
    spec: StudySpec
    study_dir: Path
    trials: list[dict]
    epochs: list[dict]
    events: list[dict]
    params: list[Param]  # the searched parameters that are columns of the trials table

    @property
    def metric(self) -> str:
        return self.spec.search.metric

    @property
    def maximize(self) -> bool:
        return self.spec.search.mode == "max"

    def metric_value(self, trial: dict) -> float:
        return _float(trial.get(self.metric))

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def _float(value) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _rows(results, name: str) -> list[dict]:
    dataset = getattr(results, name)
    return dataset.to_table().to_pylist() if dataset.schema.names else []


def load(study_dir: Path, spec: StudySpec) -> StudyData:
    from study import results

    try:
        res = results.open(study_dir)
    except FileNotFoundError as e:
        raise SpecError(f"{study_dir}: no results to report yet ({e})") from None
    trials = _rows(res, "trials")
    columns = set(trials[0]) if trials else set()
    params = [p for p in flatten(spec.params) if p.name in columns]
    return StudyData(spec, study_dir, trials, _rows(res, "epochs"), _rows(res, "events"), params)


# ------------------------------------------------------------------------------------------------- helpers


def _save(fig: Figure, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def _write_text(text: str, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _metric_text(value: float, metric: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.1f}" if metric.startswith("knn") else f"{value:.3g}"


def _scale(metric: str) -> float:
    return 100.0 if metric.startswith("knn") else 1.0


# ------------------------------------------------------------------------------------------------ 1. curves


def plot_curves(data: StudyData, path: Path) -> Path | None:
    """kNN top-1, loss and dense kNN min per epoch, one line per trial; events marked where they happened."""
    if not data.epochs:
        return None
    by_trial: dict[str, list[dict]] = {}
    for row in data.epochs:
        by_trial.setdefault(row["trial_id"], []).append(row)
    events: dict[tuple[str, int], Counter] = {}
    for ev in data.events:
        events.setdefault((ev["trial_id"], ev["epoch"]), Counter())[ev["kind"]] += 1
    status = {t["trial_id"]: t["status"] for t in data.trials}
    flagged = {t["trial_id"] for t in data.trials if t.get("verdict") and t["status"] not in POLICY_STOPS}
    init = {t["trial_id"]: _float(t.get("knn_top1_init")) for t in data.trials}

    panels = [("knn_top1", "kNN top-1 per epoch", "kNN top-1 (%)", 100.0),
              ("loss", "training loss per epoch", "loss", 1.0),
              ("dense_knn_min", "dense kNN monitor: minimum within the epoch", "dense kNN min (%)", 100.0)]
    fig = Figure(figsize=(16, 5.2))
    axes = fig.subplots(1, 3)
    max_epoch = max(r["epoch"] for r in data.epochs)
    ends: list[tuple[float, float, str, str]] = []  # the last finite kNN point of each trial, to label it
    for ax, (column, title, ylabel, scale) in zip(axes, panels, strict=True):
        for tid, rows in by_trial.items():
            rows = sorted(rows, key=lambda r: r["epoch"])
            xs, ys = [r["epoch"] for r in rows], [_float(r[column]) * scale for r in rows]
            if column == "knn_top1" and _finite(init.get(tid)):  # start from the accuracy at initialisation
                xs, ys = [0, *xs], [init[tid] * scale, *ys]
            st = status.get(tid, "running")
            color, stopped = STATUS_COLORS.get(st, "#1f77b4"), st in POLICY_STOPS
            style = "--" if stopped else "-." if tid in flagged else "-"  # -.: a verdict in observe mode
            ax.plot(xs, ys, color=color, linestyle=style, linewidth=1.6, alpha=0.85,
                    marker="o", markersize=3 if sum(map(math.isfinite, ys)) > 1 else 6)
            finite = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
            if column == "knn_top1" and finite:
                ends.append((*finite[-1], tid, color))
            # events at their epoch, on the curve (or at its last finite point when the value is NaN)
            last = math.nan
            points = dict(zip(xs, ys, strict=True))
            for x in range(0, max(xs) + 1):
                y = points.get(x, math.nan)
                last = y if math.isfinite(y) else last
                for kind, n in sorted(events.get((tid, x), Counter()).items()):
                    if math.isfinite(last):
                        ax.scatter(x + EVENT_OFFSETS.get(kind, 0.0), last, marker=EVENT_MARKERS.get(kind, "*"),
                                   s=40 + 25 * math.log2(n), facecolor=color, edgecolor="black", linewidth=0.8,
                                   zorder=3)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        first = 0 if column == "knn_top1" else 1
        ax.set_xticks(range(first, max_epoch + 1))
        ax.set_xlim(first - 0.4, max_epoch + 0.4)  # a fixed margin: the event markers' offsets stay small
        if column == "knn_top1" and len(by_trial) <= MAX_LABELLED:
            _label_ends(ax, ends)
        ax.grid(alpha=0.3)
    present = [s for s in STATUSES if s in set(status.values())]
    handles = [Line2D([], [], color=STATUS_COLORS[s], linestyle="--" if s in POLICY_STOPS else "-",
                      label=s + (" (stopped by policy)" if s in POLICY_STOPS else "")) for s in present]
    if flagged:
        handles.append(Line2D([], [], color="#555555", linestyle="-.", label="ran on with a policy verdict "
                                                                           "(observe mode)"))
    kinds = sorted({ev["kind"] for ev in data.events})
    handles += [Line2D([], [], linestyle="", marker=EVENT_MARKERS.get(k, "*"), markerfacecolor="white",
                       markeredgecolor="black", markersize=8, label=f"event: {k}") for k in kinds]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False,
               bbox_to_anchor=(0.5, -0.08))
    fig.suptitle(f"{data.spec.name}: training curves of {len(by_trial)} trials (colour: status; marker size grows "
                 f"with the number of events in the epoch)")
    return _save(fig, path)


def _label_ends(ax, ends: list[tuple[float, float, str, str]]) -> None:
    """Trial ids right of the curves' last points, spread apart where points are close."""
    if not ends:
        return
    low, high = ax.get_ylim()
    gap = 0.05 * (high - low)
    top = high
    for x in sorted({e[0] for e in ends}):
        group = sorted((e for e in ends if e[0] == x), key=lambda e: e[1])
        placed: list[float] = []
        for _, y, tid, color in group:
            y_text = max(y, placed[-1] + gap) if placed else y
            placed.append(y_text)
            top = max(top, y_text + gap)
            ax.annotate(tid, (x, y), xytext=(x + 0.2, y_text), fontsize=7, color=color, va="center",
                        arrowprops={"arrowstyle": "-", "color": color, "linewidth": 0.6, "alpha": 0.6})
    ax.set_xlim(right=max(e[0] for e in ends) + 0.9)
    ax.set_ylim(low, top)


def plot_events(data: StudyData, path: Path) -> Path | None:
    """Every instability event by training step, one row per trial that had any."""
    if not data.events:
        return None
    status = {t["trial_id"]: t["status"] for t in data.trials}
    tids = sorted({ev["trial_id"] for ev in data.events})
    row = {tid: i for i, tid in enumerate(tids)}
    fig = Figure(figsize=(12, 1.6 + 0.45 * len(tids)))
    ax = fig.subplots()
    kinds = sorted({ev["kind"] for ev in data.events})
    for k in kinds:
        evs = [ev for ev in data.events if ev["kind"] == k]
        offset = EVENT_OFFSETS.get(k, 0.0) * 2
        ax.scatter([ev["step"] for ev in evs], [row[ev["trial_id"]] + offset for ev in evs],
                   marker=EVENT_MARKERS.get(k, "*"), s=55, facecolor=[STATUS_COLORS.get(status.get(
                       ev["trial_id"]), "#1f77b4") for ev in evs], edgecolor="black", linewidth=0.8, label=k)
    ax.set_yticks(range(len(tids)))
    ax.set_yticklabels([f"{tid} ({status.get(tid, '?')})" for tid in tids])
    ax.set_ylim(-0.6, len(tids) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("training step (iteration)")
    ax.set_title(f"{data.spec.name}: instability events by step ({len(data.events)} events; face colour: "
                 f"trial status)")
    ax.grid(axis="x", alpha=0.3)
    handles = [Line2D([], [], linestyle="", marker=EVENT_MARKERS.get(k, "*"), markerfacecolor="white",
                      markeredgecolor="black", markersize=8, label=k) for k in kinds]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="event kind")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- 2. heat map


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


def _num(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def make_axis(name: str, param: Param | None, values: list) -> Axis:
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if param is not None and param.kind == "choice":
        levels = [v for v in param.args if v in present] + sorted({v for v in present if v not in param.args},
                                                                    key=str)
        return Axis(name, [_num(v) for v in levels], levels)
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in present)
    distinct = sorted(set(present)) if numeric else sorted(set(present), key=str)
    continuous = param is not None and param.kind in ("log", "uniform", "log1m")
    if not numeric or len(distinct) <= (CONTINUOUS_LEVELS if continuous else MAX_LEVELS):
        return Axis(name, [_num(v) for v in distinct], distinct)
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


def heatmap_params(data: StudyData, override: tuple[str, str] | None = None) -> tuple[str, ...]:
    """The heat map's axes: ``override``, else base_lr x batch_size, else the two searched parameters with the
    most distinct values (one or none when the study searched fewer)."""
    columns = set(data.trials[0]) if data.trials else {p.name for p in data.params}
    if override is not None:
        missing = [n for n in override if n not in columns]
        if missing:
            raise SpecError(f"--params: {', '.join(missing)} not a column of the trials table; searched "
                            f"parameters: {', '.join(p.name for p in data.params) or 'none'}")
        if override[0] == override[1]:
            raise SpecError(f"--params: give two different parameters, got {override[0]} twice")
        return tuple(override)
    names = [p.name for p in data.params]
    if "base_lr" in names and "batch_size" in names:
        return ("base_lr", "batch_size")

    def distinct(name: str) -> int:
        return len({t.get(name) for t in data.trials if t.get(name) is not None})

    ranked = sorted(names, key=lambda n: -distinct(n))  # stable: ties keep the study file's order
    return tuple(ranked[:2])


def _cells(data: StudyData, axes: list[Axis]) -> dict[tuple, list[dict]]:
    cells: dict[tuple, list[dict]] = {}
    for t in data.trials:
        key = tuple(a.index(t.get(a.name)) for a in axes)
        if None not in key:
            cells.setdefault(key, []).append(t)
    return cells


def _best(data: StudyData, trials: list[dict]) -> dict | None:
    finite = [t for t in trials if math.isfinite(data.metric_value(t))]
    if not finite:
        return None
    return (max if data.maximize else min)(finite, key=data.metric_value)


def _cell_text(data: StudyData, trials: list[dict]) -> str:
    best = _best(data, trials)
    lines = []
    if best is None:
        lines.append("/".join(sorted({t["status"] for t in trials})))
    else:
        lines.append(_metric_text(data.metric_value(best), data.metric))
        if best["status"] != "completed":
            lines.append(best["status"])
        elif best.get("verdict"):  # observe mode: it ran to the end, but the policy saw instability
            lines.append(f"({best['verdict']})")
    if len(trials) > 1:
        lines.append(f"n={len(trials)}")
    return "\n".join(lines)


def plot_heatmap(data: StudyData, names: tuple[str, ...], path: Path) -> Path | None:
    """The final metric over two parameters (a strip over one), the best trial of each cell annotated."""
    if not names or not data.trials:
        return None
    axes = [make_axis(n, data.param(n), [t.get(n) for t in data.trials]) for n in names]
    cells = _cells(data, axes)
    label = METRIC_LABELS.get(data.metric, data.metric)
    scale = _scale(data.metric)
    cmap = colormaps["viridis" if data.maximize else "viridis_r"].with_extremes(bad="white")
    finite = [data.metric_value(t) * scale for t in data.trials if math.isfinite(data.metric_value(t))]
    norm = Normalize(min(finite), max(finite)) if finite else Normalize(0, 1)
    if norm.vmin == norm.vmax:
        norm = Normalize(norm.vmin - 1e-9, norm.vmax + 1e-9)
    best_word = "highest" if data.maximize else "lowest"

    def axis_label(a: Axis) -> str:
        return a.name + (" (log-spaced bins)" if a.log else " (bins)" if a.edges else "")

    if len(axes) == 1:
        (a,) = axes
        fig = Figure(figsize=(max(6, 1.1 * len(a.labels) + 2), 4.5))
        ax = fig.subplots()
        for i, _ in enumerate(a.labels):
            trials = cells.get((i,), [])
            best = _best(data, trials)
            value = data.metric_value(best) * scale if best else math.nan
            if math.isfinite(value):
                ax.bar(i, value, color=cmap(norm(value)), edgecolor="black")
            if trials:
                ax.text(i, value if math.isfinite(value) else 0.0, _cell_text(data, trials), ha="center",
                        va="bottom", fontsize=9, color="black" if math.isfinite(value) else "#666666")
        top = max((v * scale for v in (data.metric_value(t) for t in data.trials) if math.isfinite(v)), default=1.0)
        ax.set_ylim(0, top * 1.3 if top > 0 else 1.0)
        ax.set_xlim(-0.6, len(a.labels) - 0.4)
        ax.set_xticks(range(len(a.labels)))
        ax.set_xticklabels(a.labels, rotation=30 if a.edges else 0)
        ax.set_xlabel(axis_label(a))
        ax.set_ylabel(f"final {label}")
        ax.set_title(f"{data.spec.name}: final {label} by {a.name} ({best_word} trial per value)")
        ax.grid(axis="y", alpha=0.3)
        return _save(fig, path)

    ax_x, ax_y = axes
    nx, ny = len(ax_x.labels), len(ax_y.labels)
    grid = [[math.nan] * nx for _ in range(ny)]
    for (i, j), trials in cells.items():
        best = _best(data, trials)
        grid[j][i] = data.metric_value(best) * scale if best else math.nan
    import numpy as np

    fig = Figure(figsize=(max(6.5, 1.25 * nx + 3), max(4.5, 0.9 * ny + 2.5)))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(np.array(grid, dtype=float)), cmap=cmap, norm=norm, aspect="auto",
                      origin="lower")
    for (i, j), trials in cells.items():
        value = grid[j][i]
        dark = math.isfinite(value) and (norm(value) < 0.55 if data.maximize else norm(value) > 0.45)
        ax.text(i, j, _cell_text(data, trials), ha="center", va="center", fontsize=10,
                color="white" if dark else "black" if math.isfinite(value) else "#666666")
    ax.set_xticks(range(nx))
    ax.set_xticklabels(ax_x.labels, rotation=30 if ax_x.edges else 0)
    ax.set_yticks(range(ny))
    ax.set_yticklabels(ax_y.labels)
    ax.set_xlabel(axis_label(ax_x))
    ax.set_ylabel(axis_label(ax_y))
    ax.set_xticks([x - 0.5 for x in range(1, nx)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, ny)], minor=True)
    ax.grid(which="minor", color="#dddddd", linewidth=1)
    ax.tick_params(which="minor", length=0)
    fig.colorbar(image, ax=ax, label=f"final {label}")
    ax.set_title(f"{data.spec.name}: final {label}, {ax_x.name} × {ax_y.name}\n({best_word} trial per cell; "
                 f"under the value: its status if it did not complete, (its verdict) if it did; blank: no "
                 f"finite value)", fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------ 3. status counts


def plot_status(data: StudyData, path: Path) -> Path | None:
    if not data.trials:
        return None
    counts = Counter(t["status"] for t in data.trials)
    order = [s for s in STATUSES if counts[s]] + sorted(s for s in counts if s not in STATUSES)
    fig = Figure(figsize=(7, 0.5 * len(order) + 1.8))
    ax = fig.subplots()
    ax.barh(range(len(order)), [counts[s] for s in order], color=[STATUS_COLORS.get(s, "#1f77b4") for s in order],
            edgecolor="black")
    for i, s in enumerate(order):
        ax.text(counts[s], i, f" {counts[s]}", va="center", fontsize=10)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels(order)
    ax.invert_yaxis()
    ax.set_xlabel("trials")
    ax.set_xlim(0, max(counts.values()) * 1.15 + 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"{data.spec.name}: {len(data.trials)} trials by status")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------- 4. importance


def param_importance(spec: StudySpec, study_dir: Path) -> tuple[dict[str, float] | None, str]:
    """Optuna's parameter importances of the study, or None and why not; the second value says how they were got.

    Optuna 5's default evaluator is PED-ANOVA (no scikit-learn; fANOVA and mean-decrease-impurity need it, and
    it is not installed here): it is named explicitly so that a change of default does not bring that need back.
    Only COMPLETE trials count: trials ASHA or the instability policy stopped are PRUNED in the storage.
    """
    import optuna
    from optuna.trial import TrialState

    if spec.search.storage:
        from study.runner import optuna_url

        url = optuna_url(spec)
    else:  # the study's own SQLite file, where the directory is now (it may have moved since it ran)
        db = study_dir / "optuna.db"
        if not db.exists():  # load_study would create an empty database
            return None, f"no Optuna storage found ({db} does not exist)"
        url = f"sqlite:///{db}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=spec.name, storage=url)
    except Exception as e:  # a missing study or an unreachable database: say so, do not crash
        return None, f"the Optuna study {spec.name!r} could not be loaded ({type(e).__name__}: {e})"
    states = Counter(t.state.name for t in study.trials)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    found = ", ".join(f"{n} {s}" for s, n in states.most_common()) or "no trials"
    if len(complete) < 2:
        return None, (f"Optuna computes importance from COMPLETE trials only and needs at least 2; the storage "
                      f"holds {found} (pruned: stopped by ASHA or by the instability policy)")
    varying = [p for p in {k for t in complete for k in t.params}
               if len({repr(t.params.get(p)) for t in complete}) > 1]
    if not varying:
        return None, f"no parameter varies across the {len(complete)} COMPLETE trials ({found})"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            scores = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        except Exception as e:  # an evaluator that cannot cope with these trials
            return None, f"Optuna's importance evaluator failed ({type(e).__name__}: {e})"
    equal = [str(w.message) for w in caught if "will be equal" in str(w.message)]
    if equal:
        return None, (f"too few COMPLETE trials ({len(complete)}; {found}) for PED-ANOVA to tell parameters "
                      f"apart: {equal[0]}")
    return scores, f"PED-ANOVA over {len(complete)} COMPLETE trials ({found})"


def plot_importance(data: StudyData, scores: dict[str, float], how: str, path: Path) -> Path:
    names = sorted(scores, key=lambda n: scores[n])
    fig = Figure(figsize=(7, 0.55 * len(names) + 1.8))
    ax = fig.subplots()
    ax.barh(range(len(names)), [scores[n] for n in names], color="#4c72b0", edgecolor="black")
    for i, n in enumerate(names):
        ax.text(scores[n], i, f" {scores[n]:.2f}", va="center", fontsize=10)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    ax.set_xlim(0, max(max(scores.values()), 1e-9) * 1.2)
    ax.set_xlabel(f"importance for {data.metric} ({data.spec.search.mode}), normalised to sum 1")
    ax.set_title(f"{data.spec.name}: parameter importance\n{how}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


# -------------------------------------------------------------------------------------- 5. parallel coords


def _position(param: Param | None, axis_values: list, value) -> float:
    """Where ``value`` sits on a normalised [0, 1] axis: log for log parameters, the choice index for choices."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    if param is not None and param.kind == "choice":
        levels = list(param.args)
        return levels.index(value) / max(len(levels) - 1, 1) if value in levels else math.nan
    if param is not None:
        low, high = (float(a) for a in param.args)
    else:
        finite = [v for v in axis_values if _finite(v)]
        low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if param is not None and param.kind == "log":
        low, high, value = math.log10(low), math.log10(high), math.log10(value) if value > 0 else math.nan
    elif param is not None and param.kind == "log1m":  # 1 - m log-spaced: m near 1 at the top
        low, high, value = -math.log10(1 - low), -math.log10(1 - high), -math.log10(max(1 - value, 1e-12))
    return 0.5 if high == low else (value - low) / (high - low)


def _ticks(param: Param | None, axis_values: list) -> list[tuple[float, str]]:
    if param is not None and param.kind == "choice":
        return [(_position(param, axis_values, v), _num(v)) for v in param.args]
    if param is not None and param.kind == "log":
        low, high = (float(a) for a in param.args)
        decades = range(math.ceil(math.log10(low) - 1e-9), math.floor(math.log10(high) + 1e-9) + 1)
        marks = [10.0 ** d for d in decades]
        if len(marks) > 6:
            marks = marks[:: math.ceil(len(marks) / 6)]
        marks = sorted({low, high, *marks})
        return [(_position(param, axis_values, v), f"{v:.2g}".replace("e+0", "e").replace("e-0", "e-"))
                for v in marks]
    if param is not None:
        low, high = (float(a) for a in param.args)
    else:
        finite = [v for v in axis_values if _finite(v)]
        low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    marks = [low + (high - low) * i / 4 for i in range(5)]
    return [(_position(param, axis_values, v), f"{v:.3g}") for v in marks]


def plot_parallel(data: StudyData, path: Path) -> Path | None:
    """One line per trial across the searched parameters and the metric, coloured by the metric."""
    if not data.params or not data.trials:
        return None
    names = [p.name for p in data.params]
    scale = _scale(data.metric)
    metric_values = [data.metric_value(t) * scale for t in data.trials]
    finite = [v for v in metric_values if math.isfinite(v)]
    m_low, m_high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    nan_y = -0.12  # trials without a finite metric end below the metric axis
    cmap = colormaps["viridis" if data.maximize else "viridis_r"]
    norm = Normalize(m_low, m_high if m_high > m_low else m_low + 1e-9)
    fig = Figure(figsize=(max(7, 2.4 * (len(names) + 1)), 5.5))
    ax = fig.subplots()
    columns = {n: [t.get(n) for t in data.trials] for n in names}
    order = sorted(range(len(data.trials)), key=lambda i: (math.isfinite(metric_values[i]),
                                                            norm(metric_values[i]) if math.isfinite(
                                                                metric_values[i]) else 0))
    for i in order:
        t, value = data.trials[i], metric_values[i]
        ys = [_position(data.param(n), columns[n], t.get(n)) for n in names]
        ok = math.isfinite(value)
        ys.append((value - m_low) / (m_high - m_low) if ok and m_high > m_low else 0.5 if ok else nan_y)
        ax.plot(range(len(ys)), ys, color=cmap(norm(value)) if ok else "#d62728", linestyle="-" if ok else ":",
                linewidth=2.0 if ok else 1.4, alpha=0.85, marker="o", markersize=4)
    for k, n in enumerate(names):
        ax.axvline(k, color="black", linewidth=1)
        for y, text in _ticks(data.param(n), columns[n]):
            if math.isfinite(y):
                ax.text(k - 0.03, y, text, ha="right", va="center", fontsize=8,
                        bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 0.5})
    k = len(names)
    ax.axvline(k, color="black", linewidth=1)
    for i in range(5):
        v = m_low + (m_high - m_low) * i / 4
        ax.text(k + 0.03, i / 4 if m_high > m_low else 0.5, f"{v:.3g}", ha="left", va="center", fontsize=8)
    ax.text(k + 0.03, nan_y, "n/a (NaN)", ha="left", va="center", fontsize=8, color="#d62728")
    label = f"final {METRIC_LABELS.get(data.metric, data.metric)}"
    ax.set_xticks(range(k + 1))
    ax.set_xticklabels([f"{n}\n({data.param(n).kind})" for n in names] + [label])
    ax.set_yticks([])
    ax.set_ylim(nan_y - 0.08, 1.08)
    ax.set_xlim(-0.6, k + 0.6)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=label, pad=0.06, fraction=0.05)
    ax.set_title(f"{data.spec.name}: parallel coordinates of {len(data.trials)} trials\n(axes span the search "
                 f"range, log axes for log parameters; red dotted: no finite metric)", fontsize=11)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- 6. HTML

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1500px; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; }
td.text { text-align: left; }
tr.best { font-weight: bold; background: #eef7ee; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; max-width: 70em; }
.missing { color: #a33; }
.status { padding: 0 0.4em; border-radius: 3px; color: white; }
"""


def _status_badge(status: str) -> str:
    color = STATUS_COLORS.get(status, "#1f77b4")
    text_color = "black" if status == "pending" else "white"
    return (f'<span class="status" style="background:{color};color:{text_color}">{html.escape(status)}</span>')


def _summary_table(data: StudyData) -> str:
    names = [p.name for p in data.params]
    metric = data.metric

    def key(t: dict):
        v = data.metric_value(t)
        return (not math.isfinite(v), -v if data.maximize and math.isfinite(v) else v if math.isfinite(v) else 0)

    trials = sorted(data.trials, key=key)
    best = _best(data, [t for t in trials if t["status"] == "completed"])
    head = ["trial", "status", *names, "epochs", f"final {metric}", "best knn_top1", "kNN at init", "final loss",
            "verdict", "events", "time (s)", "error"]
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for t in trials:
        verdict = t.get("verdict")
        if verdict:
            verdict = f"{verdict} at epoch {t.get('verdict_epoch')}: {t.get('verdict_reason') or ''}"
        numbers = [*(t.get(n) for n in names), t.get("epochs_done"), t.get(metric), t.get("knn_top1_best"),
                   t.get("knn_top1_init"), t.get("loss")]
        cells = [f'<td class="text">{html.escape(t["trial_id"])}</td>',
                 f'<td class="text">{_status_badge(t["status"])}</td>',
                 *(f"<td>{html.escape(_fmt(v))}</td>" for v in numbers),
                 f'<td class="text">{html.escape(verdict or "-")}</td>',
                 f"<td>{html.escape(_fmt(t.get('events')))}</td>",
                 f"<td>{html.escape(_fmt(t.get('time_total_s')))}</td>",
                 f'<td class="text">{html.escape(t.get("error") or "")}</td>']
        row_class = ' class="best"' if best is not None and t is best else ""
        out.append(f"<tr{row_class}>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _figure(fid: str, written: dict[str, Path], caption: str, missing: str, attrs: str = "") -> str:
    if fid in written:
        name = html.escape(written[fid].name)
        return (f'<figure id="{fid}"{attrs}><img src="{name}" alt="{html.escape(fid)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return f'<figure id="{fid}"{attrs}><p class="missing">{html.escape(missing)}</p></figure>'


def render_html(data: StudyData, written: dict[str, Path], heat: tuple[str, ...], importance_note: str) -> str:
    spec = data.spec
    counts = Counter(t["status"] for t in data.trials)
    count_text = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s]) or "no trials"
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    completed = [t for t in data.trials if t["status"] == "completed"]
    best = _best(data, completed)
    best_text = (f"best completed trial: {best['trial_id']}, {data.metric} = {_fmt(data.metric_value(best))}"
                 if best else "no completed trial with a finite metric")
    searched = ", ".join(f"{p.name} ({p.kind} {list(p.args)})" for p in data.params) or "nothing"
    esc = html.escape
    heat_attrs = "".join(f' data-{axis}="{esc(n)}"' for axis, n in zip(("x", "y"), heat, strict=False))
    label = METRIC_LABELS.get(data.metric, data.metric)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(spec.name)}: ssl-study report</title><style>{CSS}</style></head><body>",
        f"<h1>Study {esc(spec.name)}</h1>",
        f"<p>Generated {esc(now)} from {esc(str(data.study_dir))}.<br>"
        f"Metric: {esc(data.metric)} ({esc(spec.search.mode)}); sampler {esc(spec.search.sampler)}, scheduler "
        f"{esc(spec.scheduler.type)}, instability policy {esc(spec.stopping.mode)}; searched: {esc(searched)}.<br>"
        f"{len(data.trials)} trials: {esc(count_text)}; {esc(best_text)}.</p>",
        "<h2>Trials</h2>",
        f"<p>Sorted by final {esc(data.metric)}, best first; the best completed trial in bold. A verdict is the "
        f"instability policy's (in observe mode it is recorded but the trial goes on).</p>",
        _summary_table(data),
        "<h2>Training curves</h2>",
        _figure("curves", written, "kNN top-1 (epoch 0: at initialisation), training loss and the dense kNN "
                "monitor's minimum within each epoch, one line per trial coloured by status; dashed: stopped by the "
                "instability policy; dash-dot: ran to the end with a policy verdict (observe mode). Markers: "
                "instability events in that epoch, one shape per kind.",
                "No epoch was reported yet."),
        _figure("events", written, "Each instability event at its training step, one row per trial.",
                "No instability event was recorded."),
        "<h2>Final metric over two parameters</h2>",
        _figure("heatmap", written, f"Final {label} of the best trial in each cell (as the paper's batch x lr "
                "table); under the value: the trial's status when it did not complete, its instability verdict in "
                "parentheses when it completed with one (observe mode); n: trials in the cell.",
                "The study searched no parameter: no heat map.", heat_attrs),
        "<h2>Status counts</h2>",
        _figure("status", written, "Trials by status.", "No trials."),
        "<h2>Parameter importance</h2>",
        _figure("importance", written, importance_note, f"Not computed: {importance_note}."),
        "<h2>Parallel coordinates</h2>",
        _figure("parallel", written, "Each trial is a line across the searched parameters (normalised to the "
                "search range; log parameters on a log axis, choices at evenly spaced positions) and the final "
                "metric, coloured by the metric; red dotted lines end without a finite metric.",
                "The study searched no parameter: no parallel coordinates."),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------- the report


def write_report(study_dir: Path, *, params: tuple[str, str] | None = None, out: Path | None = None,
                 spec: StudySpec | None = None) -> Path:
    """Write the figures and ``report.html`` of the study in ``study_dir``; return the HTML path.

    ``spec`` defaults to the resolved study saved in ``study_dir`` (``study.yaml``); ``params`` names the heat
    map's axes (x, y); ``out`` defaults to ``<study_dir>/report``.
    """
    study_dir = Path(study_dir)
    if spec is None:
        from study.spec import load_spec

        spec = load_spec(study_dir / "study.yaml")
    data = load(study_dir, spec)
    heat = heatmap_params(data, params)  # a bad --params fails before anything is written
    out = Path(out) if out is not None else study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    def keep(fid: str, path: Path | None) -> None:
        if path is not None:
            written[fid] = path

    keep("curves", plot_curves(data, out / "curves.png"))
    keep("events", plot_events(data, out / "events.png"))
    keep("heatmap", plot_heatmap(data, heat, out / "heatmap.png"))
    keep("status", plot_status(data, out / "status.png"))
    scores, note = param_importance(spec, study_dir)
    if scores:
        keep("importance", plot_importance(data, scores, note, out / "importance.png"))
    keep("parallel", plot_parallel(data, out / "parallel.png"))
    for fid in FIGURES:  # a figure of an earlier report that this one could not draw must not linger
        if fid not in written:
            (out / f"{fid}.png").unlink(missing_ok=True)
    return _write_text(render_html(data, written, heat, note), out / "report.html")


def add_report_arguments(parser) -> None:
    parser.add_argument("--params", nargs=2, metavar=("X", "Y"), default=None,
                        help="the heat map's two parameters (default: base_lr batch_size when both are searched, "
                             "else the two searched parameters with the most distinct values)")
    parser.add_argument("--out", default=None, help="directory for report.html and the PNGs (default: "
                                                    "<study dir>/report)")


def report_from_args(args, spec: StudySpec) -> int:
    params = tuple(args.params) if getattr(args, "params", None) else None
    out = Path(args.out) if getattr(args, "out", None) else None
    path = write_report(spec.study_dir, params=params, out=out, spec=spec)
    print(path)
    return 0
