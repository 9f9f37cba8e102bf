"""When instability stops a run: a policy over the per-epoch signal summaries of ``trainers.signals``.

The paper (Sec. 4.1; recipe.md, "Instability") finds that unstable ViT training rarely diverges: it dips
and recovers, and the cost shows up only as 1-3 points of final accuracy. So the policy stops three kinds of
run, each with its own status:

- ``diverged``: non-finite loss or gradients. Stopped at once (the loop checks every measured step).
- ``collapsed``: the normalised outputs lost their spread (SimSiam's per-dimension std, ``collapse_threshold``
  of the healthy 1/sqrt(d)).
- ``unstable``: after ``grace_epochs`` epochs, ``patience`` epochs in a row with more than ``max_spikes`` spike
  episodes of the per-layer gradient norms, or more than ``max_dips`` significant dense-kNN dips, or an epoch kNN
  more than ``max_knn_drop`` below the run's best epoch, or more than ``max_below_init`` below the kNN of the
  same network at random initialisation (a run that unlearns: at too high a rate, seen in bench/instability.py,
  the kNN falls far below random init from the first epoch on, with no spike and no dip to show for it).

Every detector knows its own noise (trainers/detectors.py): a dense dip is significant at ``alpha`` false alarms
per epoch, a spike is judged against its layer's own robust spread, and an epoch kNN drop counts only beyond
``z_critical(alpha, 1)`` (2.3) standard errors of the difference as well as beyond its threshold, so the
default policy's false stops do not grow as the batch or the test set shrinks.

:func:`verdict` is a pure function of the epoch summaries so far: the worker applies it every epoch, and the
same function replays a finished run's history offline (``bench/instability.py`` rates the policy that way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from trainers.detectors import z_critical
from trainers.events import SUMMARY_KEYS

STOP_MODES = ("enforce", "observe", "off")
DETECTOR_FIELDS = ("alpha", "spike_threshold", "knn_window", "dip_threshold", "collapse_threshold")  # what the
# detectors are built with (trainers/detectors.py); a replay recomputes their counts from a record's traces
VERDICTS = ("diverged", "collapsed", "unstable")


@dataclass(frozen=True)
class StopPolicy:
    """Thresholds of the instability signals and what to do when they are crossed (study file: ``stopping:``).

    ``mode``: ``enforce`` stops the run on a verdict; ``observe`` records the verdicts and stops nothing (to see
    the partial failures themselves, as the paper did); ``off`` gives no verdicts.
    The detector thresholds go to :class:`trainers.signals.InstabilityMonitor`.
    """

    mode: str = "enforce"
    grace_epochs: int = 1  # no "unstable" verdict before this many epochs; diverged/collapsed count at once
    patience: int = 1  # consecutive unstable epochs before the verdict
    # The defaults are calibrated on half the recorded grid's cells and checked on the other half (bench/calibrate.py:
    # no healthy run stopped at batch 32 or 64, and 27-45% of the runs not worth finishing stopped by half the
    # budget, at precision 1.0); the spike settings are the ones bench/instability.py's sweep validated.
    alpha: float = 0.05  # false alarms per epoch allowed to each detector (trainers/detectors.py)
    spike_threshold: float = 3.0  # a spike is also at least this many times its running median
    max_spikes: int = 2  # spike episodes per epoch allowed
    knn_window: int = 3  # dense kNN measurements pooled per dip test, against the 4x as many before them
    dip_threshold: float = 0.01  # the smallest drop (dense or epoch kNN) that counts, however significant
    max_dips: int = 2  # significant dense-kNN dips per epoch allowed (at alpha 0.05 each, three are no accident)
    max_knn_drop: float = 0.02  # epoch kNN top-1 allowed below the run's best epoch (beyond its noise)
    max_below_init: float = 0.02  # epoch kNN top-1 allowed below the kNN at random initialisation (same)
    collapse_threshold: float = 0.01  # collapse when std < collapse_threshold / sqrt(d) (signals.py says why)

    def __post_init__(self) -> None:
        if self.mode not in STOP_MODES:
            raise ValueError(f"stopping.mode: {self.mode!r} is not one of: {', '.join(STOP_MODES)}")
        for name in ("grace_epochs", "max_spikes", "max_dips"):
            if getattr(self, name) < 0:
                raise ValueError(f"stopping.{name}: must be >= 0, got {getattr(self, name)!r}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"stopping.alpha: must be in (0, 1), got {self.alpha!r}")
        for name in ("patience", "knn_window", "spike_threshold", "dip_threshold", "max_knn_drop",
                     "max_below_init", "collapse_threshold"):
            if getattr(self, name) <= 0:
                raise ValueError(f"stopping.{name}: must be > 0, got {getattr(self, name)!r}")

    def monitor_options(self) -> dict:
        """The :class:`~trainers.signals.InstabilityMonitor` arguments this policy sets."""
        return {k: getattr(self, k) for k in DETECTOR_FIELDS}

    def as_dict(self) -> dict:
        return asdict(self)


HISTORY_KEYS = ("epoch", "knn_top1", "knn_top1_init", *SUMMARY_KEYS)  # what verdict judges of each epoch


def history_entry(metrics: dict) -> dict:
    """The part of an epoch's metrics (or epochs-table row) that :func:`verdict` judges."""
    return {k: metrics.get(k) for k in HISTORY_KEYS}


def _unstable_reason(summary: dict, policy: StopPolicy) -> str | None:
    def value(key: str, default: float = 0.0) -> float:
        v = summary.get(key, math.nan)
        return v if v is not None and math.isfinite(v) else default

    if value("spike_episodes") > policy.max_spikes:
        return (f"{value('spike_episodes'):.0f} gradient spike episodes > {policy.max_spikes} "
                f"(largest {value('max_spike_ratio'):.1f}x its running median)")
    if value("knn_dip_count") > policy.max_dips:
        return (f"dense kNN fell {100 * value('worst_knn_dip'):.1f} points, {value('knn_dip_z', math.inf):.1f} "
                f"standard errors ({value('knn_dip_count'):.0f} dips > {policy.max_dips})")
    # The epoch kNN's drops count beyond its sampling noise: z standard errors of the difference.
    z, se = z_critical(policy.alpha, 1), value("epoch_knn_se")
    drop = value("epoch_knn_dip")
    if drop > max(policy.max_knn_drop, z * se):
        return (f"kNN top-1 fell {100 * drop:.1f} points below its best epoch"
                f"{f', {drop / se:.1f} standard errors' if se else ''} (> {100 * policy.max_knn_drop:.1f})")
    below = value("knn_top1_init") - value("knn_top1") if value("knn_top1") else 0.0
    if below > max(policy.max_below_init, z * se):
        return (f"kNN top-1 {100 * value('knn_top1'):.1f}% is {100 * below:.1f} points below random init's "
                f"(> {100 * policy.max_below_init:.1f})")
    return None


def verdict(history: Sequence[dict], policy: StopPolicy) -> tuple[str, str] | None:
    """The verdict on a run after the last of its epoch summaries ``history`` (``SUMMARY_KEYS``, ``epoch``,
    ``knn_top1`` and ``knn_top1_init``).

    Returns ``(status, reason)`` with status in :data:`VERDICTS`, or None while the run is healthy.
    """
    if policy.mode == "off" or not history:
        return None
    last = history[-1]
    epoch = int(last.get("epoch", len(history)))
    if last.get("nonfinite"):
        return "diverged", f"non-finite loss or gradients in epoch {epoch}"
    if last.get("collapsed"):
        return "collapsed", (f"feature std {last.get('collapse_std_min', math.nan):.3g} below "
                             f"{policy.collapse_threshold} of 1/sqrt(d) in epoch {epoch}")
    if epoch <= policy.grace_epochs or len(history) < policy.patience:
        return None
    reasons = [_unstable_reason(s, policy) for s in history[-policy.patience:]]
    if all(reasons):
        return "unstable", f"{reasons[-1]} in epoch {epoch}"
    return None


def verdict_report(judged: tuple[str, str] | None, policy: StopPolicy) -> dict:
    """What an epoch's report says of :func:`verdict`'s answer ``judged``: ``verdict``, ``verdict_reason`` ("" while
    healthy) and ``stopped`` (1 when ``policy`` enforces it: the run ends after this epoch)."""
    return {"verdict": judged[0] if judged else "", "verdict_reason": judged[1] if judged else "",
            "stopped": int(judged is not None and policy.mode == "enforce")}
