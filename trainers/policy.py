"""When instability stops a run: a policy over the per-epoch signal summaries of ``trainers.signals``.

The paper (Sec. 4.1; recipe.md, "Instability") finds that unstable ViT training rarely diverges: it dips
and recovers, and the cost shows up only as 1-3 points of final accuracy. So the policy stops three kinds of
run, each with its own status:

- ``diverged``: non-finite loss or gradients. Stopped at once (the loop checks every measured step).
- ``collapsed``: the normalised outputs lost their spread (SimSiam's per-dimension std, ``collapse_threshold``
  of the healthy 1/sqrt(d)).
- ``unstable``: after ``grace_epochs`` epochs, ``patience`` epochs in a row with more than ``max_spikes`` spike
  episodes of the per-layer gradient norms, or more than ``max_dips`` dense-kNN dips, or an epoch kNN more
  than ``max_knn_drop`` below the run's best epoch, or more than ``max_below_init`` below the kNN of the same
  network at random initialisation (a run that unlearns: at too high a rate, seen in bench/instability.py, the
  kNN falls far below random init from the first epoch on, with no spike and no dip to show for it).

:func:`verdict` is a pure function of the epoch summaries so far: the worker applies it every epoch, and the
same function replays a finished run's history offline (``bench/instability.py`` rates the policy that way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from trainers.events import SUMMARY_KEYS

STOP_MODES = ("enforce", "observe", "off")
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
    spike_threshold: float = 3.0  # a gradient norm this many times its running median is a spike
    max_spikes: int = 2  # spike episodes per epoch allowed
    dip_threshold: float = 0.05  # a dense kNN (mean of the last knn_smooth values) this far below its best is a dip
    knn_smooth: int = 5  # the dense kNN of one batch is noisy (about 6 points at batch 64): average a few
    max_dips: int = 3  # dense-kNN dips per epoch allowed
    max_knn_drop: float = 0.05  # epoch kNN top-1 allowed below the run's best epoch
    max_below_init: float = 0.10  # epoch kNN top-1 allowed below the kNN at random initialisation
    collapse_threshold: float = 0.01  # collapse when std < collapse_threshold / sqrt(d) (signals.py says why)

    def __post_init__(self) -> None:
        if self.mode not in STOP_MODES:
            raise ValueError(f"stopping.mode: {self.mode!r} is not one of: {', '.join(STOP_MODES)}")
        for name in ("grace_epochs", "max_spikes", "max_dips"):
            if getattr(self, name) < 0:
                raise ValueError(f"stopping.{name}: must be >= 0, got {getattr(self, name)!r}")
        for name in ("patience", "knn_smooth", "spike_threshold", "dip_threshold", "max_knn_drop",
                     "max_below_init", "collapse_threshold"):
            if getattr(self, name) <= 0:
                raise ValueError(f"stopping.{name}: must be > 0, got {getattr(self, name)!r}")

    def monitor_options(self) -> dict:
        """The :class:`~trainers.signals.InstabilityMonitor` arguments this policy sets."""
        return {"spike_threshold": self.spike_threshold, "dip_threshold": self.dip_threshold,
                "knn_smooth": self.knn_smooth, "collapse_threshold": self.collapse_threshold}

    def as_dict(self) -> dict:
        return asdict(self)


HISTORY_KEYS = ("epoch", "knn_top1", "knn_top1_init", *SUMMARY_KEYS)  # what verdict judges of each epoch


def history_entry(metrics: dict) -> dict:
    """The part of an epoch's metrics (or epochs-table row) that :func:`verdict` judges."""
    return {k: metrics.get(k) for k in HISTORY_KEYS}


def _unstable_reason(summary: dict, policy: StopPolicy) -> str | None:
    def value(key: str) -> float:
        v = summary.get(key, math.nan)
        return v if v is not None and math.isfinite(v) else 0.0

    if value("spike_episodes") > policy.max_spikes:
        return f"{value('spike_episodes'):.0f} gradient spike episodes > {policy.max_spikes}"
    if value("knn_dip_count") > policy.max_dips:
        return f"{value('knn_dip_count'):.0f} dense kNN dips > {policy.max_dips}"
    if value("epoch_knn_dip") > policy.max_knn_drop:
        return f"kNN top-1 {value('epoch_knn_dip'):.3f} below its best > {policy.max_knn_drop}"
    below = value("knn_top1_init") - value("knn_top1") if value("knn_top1") else 0.0
    if below > policy.max_below_init:
        return f"kNN top-1 {value('knn_top1'):.3f} is {below:.3f} below random init's > {policy.max_below_init}"
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
