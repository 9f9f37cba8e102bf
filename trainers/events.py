"""What the instability signals report (trainers/signals.py), as plain data: the kinds of event, one
:class:`Event`, and one epoch's numbers (:class:`EpochSignals`). Free of torch, so that the stopping policy, the
study file's checks and the results writer on the driver read them without importing a model."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

EVENT_KINDS: tuple[str, ...] = ("grad_spike", "loss_spike", "nonfinite", "knn_dip", "collapse")

@dataclass
class EpochSignals:
    """One epoch's instability numbers, as :meth:`InstabilityMonitor.epoch_summary` reports them.

    spike_count: grad_spike events; spike_episodes: episodes opened; max_spike_ratio: the largest gradient norm
    / running median of any group (spike or not; NaN while warming up); first_layer_lead_steps: median lead (NaN
    if none); first_layer_led_frac: fraction of the episodes whose first step includes the first group (NaN if
    none); loss_spike_count; worst_knn_dip: largest drop of the dense kNN below its running best (0 if none, NaN
    without values); knn_dip_count: dense knn_dip events; epoch_knn_dip: see :meth:`InstabilityMonitor.on_epoch_knn`;
    collapse_std_min: smallest collapse std measured; collapsed, nonfinite: 0/1, any such measurement.
    """

    spike_count: float = 0.0
    spike_episodes: float = 0.0
    max_spike_ratio: float = math.nan
    first_layer_lead_steps: float = math.nan
    first_layer_led_frac: float = math.nan
    loss_spike_count: float = 0.0
    worst_knn_dip: float = math.nan
    knn_dip_z: float = math.nan
    knn_dip_count: float = 0.0
    epoch_knn_dip: float = math.nan
    epoch_knn_se: float = math.nan
    collapse_std_min: float = math.nan
    collapsed: float = 0.0
    nonfinite: float = 0.0


SUMMARY_KEYS: tuple[str, ...] = tuple(f.name for f in fields(EpochSignals))  # the keys of epoch_summary, in order


@dataclass(frozen=True)
class Event:
    """One instability event.

    ``kind`` is one of ``EVENT_KINDS``; ``layer`` a layer group of :func:`layer_groups` (grad_spike, nonfinite),
    "loss" (loss_spike, nonfinite), "dense_knn" / "epoch_knn" (knn_dip) or "features" (collapse). ``magnitude``:
    the ratio to the running median (spikes), the non-finite value itself (nonfinite), the drop from the running
    best (knn_dip) or the collapse std (collapse).
    """

    step: int
    epoch: int
    kind: str
    layer: str
    magnitude: float
