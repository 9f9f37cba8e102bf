"""``events.png``: every instability event by training step, one row per trial (the paper's "spike precedes the
dip" view)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from study.report.data import StudyData
from study.report.style import EVENT_MARKERS, EVENT_OFFSETS, STATUS_COLORS, save


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
    return save(fig, path)
