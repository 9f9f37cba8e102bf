"""``parallel.png``: parallel coordinates over the searched parameters and the metric, one line per trial."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from search_spaces import Param
from study.best import finite
from study.report.data import StudyData
from study.report.style import METRIC_LABELS, num, save, scale


def _range(param: Param | None, axis_values: list) -> tuple[float, float]:
    """The span of an axis: the search range, else the values' (a column the study did not search)."""
    if param is not None:
        low, high = (float(a) for a in param.args)
        return low, high
    values = [v for v in axis_values if finite(v)]
    return (min(values), max(values)) if values else (0.0, 1.0)


def _position(param: Param | None, axis_values: list, value) -> float:
    """Where ``value`` sits on a normalised [0, 1] axis: log for log parameters, the choice index for choices."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    if param is not None and param.kind == "choice":
        levels = list(param.args)
        return levels.index(value) / max(len(levels) - 1, 1) if value in levels else math.nan
    low, high = _range(param, axis_values)
    if param is not None and param.kind == "log":
        low, high, value = math.log10(low), math.log10(high), math.log10(value) if value > 0 else math.nan
    elif param is not None and param.kind == "log1m":  # 1 - m log-spaced: m near 1 at the top
        low, high, value = -math.log10(1 - low), -math.log10(1 - high), -math.log10(max(1 - value, 1e-12))
    return 0.5 if high == low else (value - low) / (high - low)


def _ticks(param: Param | None, axis_values: list) -> list[tuple[float, str]]:
    if param is not None and param.kind == "choice":
        return [(_position(param, axis_values, v), num(v)) for v in param.args]
    low, high = _range(param, axis_values)
    if param is not None and param.kind == "log":
        decades = range(math.ceil(math.log10(low) - 1e-9), math.floor(math.log10(high) + 1e-9) + 1)
        marks = [10.0 ** d for d in decades]
        if len(marks) > 6:
            marks = marks[:: math.ceil(len(marks) / 6)]
        marks = sorted({low, high, *marks})
        return [(_position(param, axis_values, v), f"{v:.2g}".replace("e+0", "e").replace("e-0", "e-"))
                for v in marks]
    marks = [low + (high - low) * i / 4 for i in range(5)]
    return [(_position(param, axis_values, v), f"{v:.3g}") for v in marks]


def plot_parallel(data: StudyData, path: Path) -> Path | None:
    """One line per trial across the searched parameters and the metric, coloured by the metric."""
    if not data.params or not data.trials:
        return None
    names = [p.name for p in data.params]
    factor = scale(data.metric)
    metric_values = [data.metric_value(t) * factor for t in data.trials]
    reported = [v for v in metric_values if math.isfinite(v)]
    m_low, m_high = (min(reported), max(reported)) if reported else (0.0, 1.0)
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
    return save(fig, path)
