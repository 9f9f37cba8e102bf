"""``status.png``: trials by status."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from matplotlib.figure import Figure

from study.report.data import StudyData
from study.report.style import STATUS_COLORS, save
from study.status import STATUSES


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
    return save(fig, path)
