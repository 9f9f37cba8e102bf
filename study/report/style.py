"""What the figures and the page share: status colours, event markers, metric labels and scales, number labels,
and the one way a figure is saved."""

from __future__ import annotations

from pathlib import Path

from data.atomic import atomic_path

STATUS_COLORS = {"completed": "#2ca02c", "pruned": "#8c8c8c", "diverged": "#d62728", "collapsed": "#9467bd",
                 "unstable": "#ff7f0e", "failed": "#000000", "running": "#1f77b4", "pending": "#c7c7c7"}
# Marker shape per event kind (trainers/signals.py EVENT_KINDS); the face takes the trial's status colour.
EVENT_MARKERS = {"grad_spike": "^", "loss_spike": "v", "nonfinite": "X", "knn_dip": "o", "collapse": "s"}
EVENT_OFFSETS = {"grad_spike": -0.12, "loss_spike": -0.06, "nonfinite": 0.0, "knn_dip": 0.06, "collapse": 0.12}
METRIC_LABELS = {"knn_top1": "kNN top-1 (%)", "loss": "training loss"}


def scale(metric: str) -> float:
    """What a metric is multiplied by on an axis: accuracies (fractions in the tables) are drawn in percent."""
    return 100.0 if metric.startswith("knn") else 1.0


def num(value) -> str:
    """A parameter value as an axis label."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def save(fig, path: Path) -> Path:
    """``fig`` (a ``matplotlib.figure.Figure``) as a PNG at ``path``, written atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path
