"""``curves.png``: kNN top-1, training loss and dense-kNN minimum per epoch, one line per trial coloured by status,
instability events marked at their epoch."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from study.best import finite, number
from study.report.data import StudyData
from study.report.style import EVENT_MARKERS, EVENT_OFFSETS, STATUS_COLORS, save
from study.status import STATUSES
from trainers.policy import VERDICTS

MAX_LABELLED = 12  # trials whose id labels their kNN curve


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
    flagged = {t["trial_id"] for t in data.trials if t.get("verdict") and t["status"] not in VERDICTS}
    init = {t["trial_id"]: number(t.get("knn_top1_init")) for t in data.trials}

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
            xs, ys = [r["epoch"] for r in rows], [number(r[column]) * scale for r in rows]
            if column == "knn_top1" and finite(init.get(tid)):  # start from the accuracy at initialisation
                xs, ys = [0, *xs], [init[tid] * scale, *ys]
            st = status.get(tid, "running")
            color, stopped = STATUS_COLORS.get(st, "#1f77b4"), st in VERDICTS
            style = "--" if stopped else "-." if tid in flagged else "-"  # -.: a verdict in observe mode
            ax.plot(xs, ys, color=color, linestyle=style, linewidth=1.6, alpha=0.85,
                    marker="o", markersize=3 if sum(map(math.isfinite, ys)) > 1 else 6)
            points = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
            if column == "knn_top1" and points:
                ends.append((*points[-1], tid, color))
            # events at their epoch, on the curve (or at its last finite point when the value is NaN)
            last = math.nan
            by_epoch = dict(zip(xs, ys, strict=True))
            for x in range(0, max(xs) + 1):
                y = by_epoch.get(x, math.nan)
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
    handles = [Line2D([], [], color=STATUS_COLORS[s], linestyle="--" if s in VERDICTS else "-",
                      label=s + (" (stopped by policy)" if s in VERDICTS else "")) for s in present]
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
    return save(fig, path)


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
