"""``heatmap.png``: the final study metric over two parameters, as the paper's batch x lr table (a bar strip over
one), the best trial of each cell annotated."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from study.report.data import StudyData
from study.report.grid import Axis, cells, make_axis
from study.report.style import METRIC_LABELS, save, scale


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


def plot_heatmap(data: StudyData, names: tuple[str, ...], path: Path) -> Path | None:
    """The final metric over two parameters (a strip over one), the best trial of each cell annotated."""
    if not names or not data.trials:
        return None
    axes = [make_axis(n, data.param(n), [t.get(n) for t in data.trials]) for n in names]
    by_cell = cells(data, axes)
    label = METRIC_LABELS.get(data.metric, data.metric)
    factor = scale(data.metric)
    cmap = colormaps["viridis" if data.maximize else "viridis_r"].with_extremes(bad="white")
    finite = [data.metric_value(t) * factor for t in data.trials if math.isfinite(data.metric_value(t))]
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
            trials = by_cell.get((i,), [])
            best = data.best(trials)
            value = data.metric_value(best) * factor if best else math.nan
            if math.isfinite(value):
                ax.bar(i, value, color=cmap(norm(value)), edgecolor="black")
            if trials:
                ax.text(i, value if math.isfinite(value) else 0.0, _cell_text(data, trials), ha="center",
                        va="bottom", fontsize=9, color="black" if math.isfinite(value) else "#666666")
        top = max(finite, default=1.0)
        ax.set_ylim(0, top * 1.3 if top > 0 else 1.0)
        ax.set_xlim(-0.6, len(a.labels) - 0.4)
        ax.set_xticks(range(len(a.labels)))
        ax.set_xticklabels(a.labels, rotation=30 if a.edges else 0)
        ax.set_xlabel(axis_label(a))
        ax.set_ylabel(f"final {label}")
        ax.set_title(f"{data.spec.name}: final {label} by {a.name} ({best_word} trial per value)")
        ax.grid(axis="y", alpha=0.3)
        return save(fig, path)

    import numpy as np

    ax_x, ax_y = axes
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
    return save(fig, path)
