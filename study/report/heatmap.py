"""``heatmap.png``: the final study metric over the searched parameters. Over two, a heat map as the paper's
batch x lr table, the best trial of each cell annotated; over one choice, a bar strip; over one searched range
(the bundled study's base_lr), a scatter of every trial on that parameter's own axis (log where the space is),
coloured by status: levels of a range are not categories, and 0.00105 and 0.0012 are not one bar apart."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from search_spaces import Param
from study.best import finite
from study.report.data import StudyData
from study.report.grid import Axis, cells, make_axis, scatter_param
from study.report.style import METRIC_LABELS, STATUS_COLORS, save, scale
from study.status import STATUSES

MAX_LABELLED = 12  # trials whose id labels their point in the scatter
LOST_Y = 0.04  # the scatter's trials without a finite metric: this far up the axes, under the lowest value


def _metric_text(value: float, metric: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.1f}" if metric.startswith("knn") else f"{value:.3g}"


def _cell_text(data: StudyData, trials: list[dict]) -> str:
    best = data.best(trials)
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


def heatmap_figure(data: StudyData, names: tuple[str, ...]) -> Figure | None:
    """The figure over ``names`` (two: a heat map; one: a scatter for a range, a bar strip for a choice)."""
    if not names or not data.trials:
        return None
    param = scatter_param(data, names)
    if param is not None:
        return _scatter(data, param)
    axes = [make_axis(n, data.param(n), [t.get(n) for t in data.trials]) for n in names]
    return _strip(data, *axes) if len(axes) == 1 else _grid(data, *axes)


def plot_heatmap(data: StudyData, names: tuple[str, ...], path: Path) -> Path | None:
    fig = heatmap_figure(data, names)
    return None if fig is None else save(fig, path)


def _colours(data: StudyData):
    """The colour map and norm of the metric over every trial with a finite value, and those values."""
    factor = scale(data.metric)
    cmap = colormaps["viridis" if data.maximize else "viridis_r"].with_extremes(bad="white")
    values = [data.metric_value(t) * factor for t in data.trials if math.isfinite(data.metric_value(t))]
    norm = Normalize(min(values), max(values)) if values else Normalize(0, 1)
    if norm.vmin == norm.vmax:
        norm = Normalize(norm.vmin - 1e-9, norm.vmax + 1e-9)
    return cmap, norm, values


def _axis_label(a: Axis) -> str:
    return a.name + (" (log-spaced bins)" if a.log else " (bins)" if a.edges else "")


def _x_range(ax, param: Param, values: list[float]) -> None:
    """x on the space's own scale (log for log, 1 - m log-spaced for log1m, else linear), spanning the search
    range and any value outside it, with 4% of it to spare on each side."""
    low, high = min(float(param.args[0]), *values), max(float(param.args[1]), *values)
    if param.kind == "log":
        ax.set_xscale("log")
    elif param.kind == "log1m":  # momentum: 0.9, 0.99, 0.999 equally spaced
        import numpy as np

        ax.set_xscale("function", functions=(lambda m: -np.log10(np.clip(1 - m, 1e-12, None)),
                                             lambda y: 1 - 10.0 ** -y))
        ticks = [low, *(m for m in (1 - 10.0 ** -k for k in range(1, 13)) if low < m < high), high]
        ax.set_xticks(ticks, [f"{v:.6g}" for v in ticks])  # 0.9999, not 1
    scaled = ax.xaxis.get_transform()
    a, b = scaled.transform([low, high])
    pad = 0.04 * (b - a)
    ax.set_xlim(*scaled.inverted().transform([a - pad, b + pad]))
    for bound in param.args:
        ax.axvline(float(bound), color="#999999", linestyle=":", linewidth=1)


def _scatter(data: StudyData, param: Param) -> Figure:
    """Each trial's final metric against ``param``, coloured by status; an x at the bottom: no finite value."""
    label = METRIC_LABELS.get(data.metric, data.metric)
    factor = scale(data.metric)
    placed = [t for t in data.trials if finite(t.get(param.name))]
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    _x_range(ax, param, [float(t[param.name]) for t in placed])
    order = [s for s in STATUSES if any(t["status"] == s for t in placed)]
    order += sorted({t["status"] for t in placed} - set(order))
    for status in order:
        color = STATUS_COLORS.get(status, "#1f77b4")
        group = [t for t in placed if t["status"] == status and math.isfinite(data.metric_value(t))]
        if group:
            ax.scatter([t[param.name] for t in group], [data.metric_value(t) * factor for t in group], s=60,
                       color=color, edgecolor="black", label=status, zorder=3)
        lost = [t for t in placed if t["status"] == status and not math.isfinite(data.metric_value(t))]
        if lost:  # on the bottom edge whatever the metric's range: x in data, y in axes coordinates
            ax.scatter([t[param.name] for t in lost], [LOST_Y] * len(lost), transform=ax.get_xaxis_transform(),
                       marker="x", s=60, color=color, label=f"{status}, no finite value", zorder=3)
    if any(not math.isfinite(data.metric_value(t)) for t in placed):
        low, high = ax.get_ylim()  # a grey band under the lowest value for the x's: not a value on the axis
        ax.axhspan(low - 0.15 * (high - low), low, color="#eeeeee", zorder=0)
        ax.set_ylim(low - 0.15 * (high - low), high)
    if len(placed) <= MAX_LABELLED:
        for t in placed:
            y = data.metric_value(t) * factor
            ax.annotate(t["trial_id"], (t[param.name], y if math.isfinite(y) else LOST_Y), xytext=(5, 4),
                        textcoords="offset points", fontsize=7,
                        xycoords="data" if math.isfinite(y) else ax.get_xaxis_transform())
    low, high = (f"{float(v):.6g}" for v in param.args)
    ax.set_xlabel(f"{param.name} ({param.kind} search range [{low}, {high}], dotted)")
    ax.set_ylabel(f"final {label}")
    ax.legend(loc="best", fontsize=9)
    ax.grid(alpha=0.3)
    ax.set_title(f"{data.spec.name}: final {label} of each trial by {param.name} (colour: status)")
    return fig


def _strip(data: StudyData, a: Axis) -> Figure:
    """One bar per level of a choice: the best trial's final metric."""
    by_cell = cells(data, [a])
    label = METRIC_LABELS.get(data.metric, data.metric)
    factor = scale(data.metric)
    cmap, norm, values = _colours(data)
    fig = Figure(figsize=(max(6, 1.1 * len(a.labels) + 2), 4.5))
    ax = fig.subplots()
    for i, _ in enumerate(a.labels):
        trials = by_cell.get((i,), [])
        best = data.best(trials)
        value = data.metric_value(best) * factor if best else math.nan
        if math.isfinite(value):
            ax.bar(i, value, color=cmap(norm(value)), edgecolor="black")
        if trials:
            ax.text(i, value if math.isfinite(value) else 0.0, _cell_text(data, trials), ha="center",
                    va="bottom", fontsize=9, color="black" if math.isfinite(value) else "#666666")
    top = max(values, default=1.0)
    ax.set_ylim(0, top * 1.3 if top > 0 else 1.0)
    ax.set_xlim(-0.6, len(a.labels) - 0.4)
    ax.set_xticks(range(len(a.labels)))
    ax.set_xticklabels(a.labels, rotation=30 if a.edges else 0)
    ax.set_xlabel(_axis_label(a))
    ax.set_ylabel(f"final {label}")
    best_word = "highest" if data.maximize else "lowest"
    ax.set_title(f"{data.spec.name}: final {label} by {a.name} ({best_word} trial per value)")
    ax.grid(axis="y", alpha=0.3)
    return fig


def _grid(data: StudyData, ax_x: Axis, ax_y: Axis) -> Figure:
    """The heat map: the best trial's final metric in each cell of two parameters' levels."""
    import numpy as np

    by_cell = cells(data, [ax_x, ax_y])
    label = METRIC_LABELS.get(data.metric, data.metric)
    factor = scale(data.metric)
    cmap, norm, _ = _colours(data)
    nx, ny = len(ax_x.labels), len(ax_y.labels)
    grid = [[math.nan] * nx for _ in range(ny)]
    for (i, j), trials in by_cell.items():
        best = data.best(trials)
        grid[j][i] = data.metric_value(best) * factor if best else math.nan
    fig = Figure(figsize=(max(6.5, 1.25 * nx + 3), max(4.5, 0.9 * ny + 2.5)))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(np.array(grid, dtype=float)), cmap=cmap, norm=norm, aspect="auto",
                      origin="lower")
    for (i, j), trials in by_cell.items():
        value = grid[j][i]
        dark = math.isfinite(value) and (norm(value) < 0.55 if data.maximize else norm(value) > 0.45)
        ax.text(i, j, _cell_text(data, trials), ha="center", va="center", fontsize=10,
                color="white" if dark else "black" if math.isfinite(value) else "#666666")
    ax.set_xticks(range(nx))
    ax.set_xticklabels(ax_x.labels, rotation=30 if ax_x.edges else 0)
    ax.set_yticks(range(ny))
    ax.set_yticklabels(ax_y.labels)
    ax.set_xlabel(_axis_label(ax_x))
    ax.set_ylabel(_axis_label(ax_y))
    ax.set_xticks([x - 0.5 for x in range(1, nx)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, ny)], minor=True)
    ax.grid(which="minor", color="#dddddd", linewidth=1)
    ax.tick_params(which="minor", length=0)
    fig.colorbar(image, ax=ax, label=f"final {label}")
    best_word = "highest" if data.maximize else "lowest"
    ax.set_title(f"{data.spec.name}: final {label}, {ax_x.name} × {ax_y.name}\n({best_word} trial per cell; "
                 f"under the value: its status if it did not complete, (its verdict) if it did; blank: no "
                 f"finite value)", fontsize=10)
    return fig
