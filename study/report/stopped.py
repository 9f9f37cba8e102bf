"""``stopped.png``: each run judged unstable, its kNN against the noise it was judged by, and the verdict.

One panel per such run (at most ``MAX_PANELS``): the epoch kNN top-1 with its sampling band (2.3 standard errors on
the epoch's test images, ``epoch_knn_se``: what a drop had to exceed), and where the run kept its per-step trace
(``train.trace``), every dense kNN measurement with its binomial band on the batch's images
(trainers/detectors.py). The verdict's epoch is a vertical line, its reason the panel's title.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

from study.best import number
from study.report.data import StudyData
from study.report.style import STATUS_COLORS, save
from trainers.detectors import z_critical

MAX_PANELS = 12


def _trace(trial: dict) -> list[dict]:
    """The trial's per-step trace beside its last checkpoint, or [] (not recorded, or not on this machine)."""
    import pyarrow.parquet as pq

    path = Path(trial.get("checkpoint") or "") / "trace.parquet"
    try:
        return pq.read_table(path, columns=["step", "epoch", "dense_knn"]).to_pylist() if path.is_file() else []
    except (OSError, ValueError):
        return []


def plot_stopped(data: StudyData, path: Path) -> Path | None:
    """One panel per trial judged unstable (diverged and collapsed runs need no noise band); None when none is."""
    judged = [t for t in data.trials if t.get("verdict") == "unstable"][:MAX_PANELS]  # the noise-judged ones
    if not judged:
        return None
    z = z_critical(data.spec.stopping.alpha, 1)
    cols = min(3, len(judged))
    rows = -(-len(judged) // cols)
    fig = Figure(figsize=(5.4 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    batch = data.spec.train_config().batch_size
    for ax, trial in zip(axes, judged, strict=False):
        epochs = sorted((r for r in data.epochs if r["trial_id"] == trial["trial_id"]), key=lambda r: r["epoch"])
        steps_per_epoch = 1.0
        trace = [r for r in _trace(trial) if r["dense_knn"] is not None and math.isfinite(r["dense_knn"])]
        if trace:  # draw against epochs: step / steps per epoch
            steps_per_epoch = (max(r["step"] for r in trace) + 1) / max(r["epoch"] for r in trace)
            n = number(trial.get("batch_size")) if math.isfinite(number(trial.get("batch_size"))) else batch
            x = [(r["step"] + 1) / steps_per_epoch for r in trace]
            p = [100 * r["dense_knn"] for r in trace]
            band = [2 * 100 * math.sqrt(max(v / 100 * (1 - v / 100), 1e-6) / n) for v in p]
            ax.fill_between(x, [a - b for a, b in zip(p, band, strict=True)],
                            [a + b for a, b in zip(p, band, strict=True)], color="#9ecae1", alpha=0.35, lw=0)
            ax.plot(x, p, ".", ms=2.5, color="#3182bd", label=f"dense kNN (batch of {n:.0f}) +- 2 s.e.")
        xs = [r["epoch"] for r in epochs]
        knn = [100 * number(r.get("knn_top1")) for r in epochs]
        se = [100 * number(r.get("epoch_knn_se")) / math.sqrt(2) for r in epochs]  # one value's, not a difference's
        color = STATUS_COLORS.get(trial["status"], "#1f77b4")
        if all(math.isfinite(s) for s in se):
            ax.fill_between(xs, [k - z * s for k, s in zip(knn, se, strict=True)],
                            [k + z * s for k, s in zip(knn, se, strict=True)], color=color, alpha=0.2, lw=0)
        ax.plot(xs, knn, "o-", color=color, label=f"epoch kNN top-1 +- {z:.1f} s.e.")
        init = 100 * number(trial.get("knn_top1_init"))
        if math.isfinite(init):
            ax.axhline(init, color="gray", ls=":", lw=1, label="random init")
        at = number(trial.get("verdict_epoch"))
        if math.isfinite(at):
            ax.axvline(at, color="black", ls="--", lw=1)
        reason = str(trial.get("verdict_reason") or trial.get("verdict"))
        ax.set_title(f"{trial['trial_id']} ({trial['status']}): {reason}", fontsize=8, wrap=True)
        ax.set_xlabel("epoch")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[len(judged):]:
        ax.set_visible(False)
    fig.suptitle(f"{data.spec.name}: runs judged unstable, against their noise (dashed: the verdict)")
    return save(fig, path)
