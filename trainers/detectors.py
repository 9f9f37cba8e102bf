"""Instability detectors that know their own noise (MoCo v3 paper, Sec. 4.1; issue 26). Plain Python, no torch:
the trainer feeds them each step's numbers (trainers/signals.py) and a replay feeds them a record's traces
(study/replay.py), so both compute the same counts from the same series.

Every detector runs a number of tests per epoch (one per measurement) and judges each against the noise that
measurement carries, at the normal quantile of ``alpha / tests`` (Bonferroni): a stationary healthy series raises
an alarm in at most a fraction ``alpha`` of its epochs, at any batch size, bank or layer.

- Dense kNN dips (:class:`DipDetector`): each measurement is a count of correct predictions out of ``n`` images (the
  global batch), so its noise is binomial: sqrt(p (1 - p) / n) is 8.1 points at n = 32 and p = 0.7, 0.7 at n =
  4,096. The last ``window`` measurements, pooled, are tested against the ``4 x window`` before them (one-sided two-
  proportion z-test); a dip must also be ``min_drop`` (1 point) deep, so that at n = 4,096 a real but tiny drift
  (pooled noise 0.3 points) is not a dip. A dip of three times one measurement's noise is caught within 2-4
  measurements (median of 20 draws; 7 at most) at n = 32, 256 and 4,096 (tests/test_detectors.py). A pooled window
  was chosen over a CUSUM because its alarm carries a plain effect size (points) and a z score the verdict can
  print, and its false-alarm rate follows from one quantile; the reference window, not the running best, is the
  "recent level": the best of many noisy values is biased up by about 2 standard errors after 50 measurements, which
  made every run at batch 32-64 "dip".
- Gradient and loss spikes (:class:`SpikeDetector`): a value is judged against the median and the MAD of the log
  values in its window (a robust scale of the series itself), and must also exceed ``threshold`` times the median:
  heavy-tailed but healthy layers (log-sd 0.5: 3x is a 2.2-sigma event, every ~70 steps) do not trip it.
- Epoch kNN drops (:func:`epoch_noise`): the epoch kNN on m test images has a standard error sqrt(p (1 - p) / m)
  (2,000 images at 70%: 1.0 point; 10,000: 0.46); a drop from the run's best or below random init counts only
  beyond ``z`` times the standard error of the difference.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

from trainers.events import EpochSignals, Event

MAD_TO_SD = 1.4826  # a normal variable's sd / MAD
MAD_EFFICIENCY = 0.37  # the MAD's efficiency at the normal: its scale is worth 0.37 (n - 1) degrees of freedom
REFERENCE_WINDOWS = 4  # the dip test's reference: this many windows before the current one


def z_critical(alpha: float, tests: int) -> float:
    """The one-sided normal quantile at which ``tests`` tests raise a false alarm with probability ``alpha``."""
    return NormalDist().inv_cdf(1.0 - alpha / max(int(tests), 1))


def t_critical(z: float, df: float) -> float:
    """Student's t quantile at the normal quantile ``z`` with ``df`` degrees of freedom (Cornish-Fisher,
    Abramowitz & Stegun 26.7.5). At the 1e-4 tail its tail probability is 1.00e-4 at 30 degrees of freedom,
    1.03e-4 at 10 and 1.26e-4 at 5 (numerical integration: tests/test_detectors.py)."""
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def epoch_noise(p: float, images: float) -> float:
    """Standard error of the difference of two epoch kNN top-1 values ``p`` on ``images`` test images (each
    binomial; the images are the same, so this is an upper bound)."""
    if not (images and math.isfinite(images) and math.isfinite(p)):
        return 0.0
    return math.sqrt(2.0 * p * (1.0 - p) / images)


class SpikeDetector:
    """Spikes of a positive series: ``value / median > threshold`` and ``(log value - median of logs) / robust
    sd > z``, the median and robust sd (1.4826 x MAD) of the log values of the last ``window`` finite values.

    Judged once ``warmup`` values are in the window; non-finite values are neither judged nor added, every finite
    one (spikes too) enters the window. ``last_ratio`` / ``last_z``: the latest value's (NaN while warming up).
    ``z`` is :func:`z_critical` of ``alpha`` over ``tests`` per epoch (``z=None``), or given.
    """

    def __init__(self, window: int = 50, threshold: float = 3.0, warmup: int = 10, alpha: float = 0.01,
                 tests: int = 100, z: float | None = None) -> None:
        if window < 1 or not 1 <= warmup <= window:
            raise ValueError(f"need window >= 1 and 1 <= warmup <= window, got window={window}, warmup={warmup}")
        if threshold <= 0:
            raise ValueError(f"threshold must be positive, got {threshold}")
        self.window, self.threshold, self.warmup = window, threshold, warmup
        self.z = z_critical(alpha, tests) if z is None else z
        # The scale is estimated from the window: its t quantile, not the normal one (at window 50: 4.6 for 3.7).
        self._z_by_count = [t_critical(self.z, max(MAD_EFFICIENCY * (n - 1), 5.0)) for n in range(window + 1)]
        self.values: deque[float] = deque(maxlen=window)
        self.logs: deque[float] = deque(maxlen=window)  # log of each positive value, computed once
        self.last_ratio = self.last_z = math.nan

    def update(self, value: float) -> float | None:
        """Add ``value``; return its ratio to the running median when it is a spike, else None."""
        value = float(value)
        ratio = z = math.nan
        if math.isfinite(value):
            if len(self.values) >= self.warmup:
                median = statistics.median(self.values)
                if median > 0 and value > 0 and self.logs:
                    ratio = value / median
                    centre = statistics.median(self.logs)
                    scale = MAD_TO_SD * statistics.median([abs(v - centre) for v in self.logs])
                    up = math.log(value) - centre
                    z = up / scale if scale > 0 else math.copysign(math.inf, up) if up else 0.0
            self.values.append(value)
            if value > 0:
                self.logs.append(math.log(value))
        self.last_ratio, self.last_z = ratio, z
        return ratio if ratio > self.threshold and z > self._z_by_count[len(self.values) - 1] else None

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values = deque((float(v) for v in state["values"]), maxlen=self.window)
        self.logs = deque((math.log(v) for v in self.values if v > 0), maxlen=self.window)
        self.last_ratio = self.last_z = math.nan


class DipDetector:
    """Dips of an accuracy measured as counts: the last ``window`` measurements pooled (C/N) against the
    ``REFERENCE_WINDOWS x window`` before them, a one-sided two-proportion z-test.

    A test runs once the reference is full. A dip begins when ``z > self.z`` and the pooled drop is at least
    ``min_drop``, and lasts while both hold: one dip counts once however many tests see it. ``last_drop`` and
    ``last_z``: the latest test's (NaN before the first test); ``update`` returns ``(drop, z)`` when a dip begins.
    """

    def __init__(self, window: int = 5, alpha: float = 0.01, tests: int = 10, min_drop: float = 0.01,
                 z: float | None = None) -> None:
        if window < 1 or min_drop < 0:
            raise ValueError(f"need window >= 1 and min_drop >= 0, got {window}, {min_drop}")
        self.window, self.min_drop = window, min_drop
        self.z = z_critical(alpha, tests) if z is None else z
        self.counts: deque[tuple[float, float]] = deque(maxlen=(REFERENCE_WINDOWS + 1) * window)
        self.in_dip = False
        self.last_drop = self.last_z = math.nan

    def update(self, accuracy: float, n: float) -> tuple[float, float] | None:
        """Add one measurement (``accuracy`` of ``n`` images); return ``(drop, z)`` when a dip begins."""
        if not (math.isfinite(accuracy) and n > 0):
            return None
        self.counts.append((accuracy * n, float(n)))
        if len(self.counts) < self.counts.maxlen:
            return None
        items = list(self.counts)
        c_ref, n_ref = map(sum, zip(*items[:-self.window], strict=True))
        c_now, n_now = map(sum, zip(*items[-self.window:], strict=True))
        p_ref, p_now, pooled = c_ref / n_ref, c_now / n_now, (c_ref + c_now) / (n_ref + n_now)
        se = math.sqrt(pooled * (1 - pooled) * (1 / n_ref + 1 / n_now))
        self.last_drop = p_ref - p_now
        self.last_z = self.last_drop / se if se > 0 else math.copysign(math.inf, self.last_drop) if self.last_drop \
            else 0.0
        dipping = self.last_z > self.z and self.last_drop >= self.min_drop
        began, self.in_dip = dipping and not self.in_dip, dipping
        return (self.last_drop, self.last_z) if began else None

    def state_dict(self) -> dict:
        return {"counts": [list(c) for c in self.counts], "in_dip": self.in_dip}

    def load_state_dict(self, state: dict) -> None:
        self.counts = deque((tuple(c) for c in state["counts"]), maxlen=self.counts.maxlen)
        self.in_dip = bool(state["in_dip"])
        self.last_drop = self.last_z = math.nan


def _nanmax(a: float, b: float) -> float:
    return b if math.isnan(a) else a if math.isnan(b) else max(a, b)


def _nanmin(a: float, b: float) -> float:
    return b if math.isnan(a) else a if math.isnan(b) else min(a, b)


@dataclass
class Detectors:
    """Every detector of a run, fed plain numbers: what the trainer measures each step (``on_loss``,
    ``on_grads``, ``on_collapse``, ``on_dense_knn``) and each epoch (``on_epoch_knn``), with events and the
    epoch's :class:`~trainers.events.EpochSignals`.

    Settings: ``alpha`` (false alarms per epoch, each detector), ``spike_threshold`` (a spike's smallest ratio to
    the median), ``window`` / ``warmup`` (the spike detectors'), ``knn_window`` and ``dip_threshold`` (the dense
    dip test's window and smallest drop), ``collapse_threshold``, ``lead_window``; the run's shape:
    ``spike_tests`` (measured steps per epoch), ``dense_tests`` (dense kNN measurements per epoch),
    ``dense_images`` (images per dense measurement: the global batch), ``knn_images`` (test images of the
    epoch kNN).

    Spike episodes: a grad spike more than ``lead_window`` measured steps after the previous one opens an
    episode; its first layers are the groups spiking at its first step; its lead, once both have spiked, is the
    first spike step of the last backbone group minus that of the first (``groups``' first and last before
    "heads"), kept when at most ``lead_window`` (negative when the last block spiked first).
    """

    alpha: float = 0.01
    spike_threshold: float = 3.0
    window: int = 50
    warmup: int = 10
    knn_window: int = 5
    dip_threshold: float = 0.01
    collapse_threshold: float = 0.01
    lead_window: int = 50
    spike_tests: int = 100
    dense_tests: int = 10
    dense_images: float = 256.0
    knn_images: float = math.nan
    groups: list[str] = field(default_factory=list)  # layer groups, in forward order ("heads" last)

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1 or self.lead_window < 0 or self.collapse_threshold < 0:
            raise ValueError(f"need 0 < alpha < 1, lead_window >= 0 and collapse_threshold >= 0, got {self.alpha}, "
                             f"{self.lead_window}, {self.collapse_threshold}")
        self.z_spike = z_critical(self.alpha, self.spike_tests)
        self.z_epoch = z_critical(self.alpha, 1)
        self.loss_detector = self._spike_detector()
        self.grad_detectors: dict[str, SpikeDetector] = {}
        self.dense_knn = DipDetector(self.knn_window, self.alpha, self.dense_tests, self.dip_threshold)
        self.events: list[Event] = []
        self.leads: list[int] = []
        self.episodes: list[dict] = []
        self.last_norms: dict[str, float] = {}  # latest measured gradient norm per group
        self.last_ratios: dict[str, float] = {}  # ... divided by its running median (NaN while warming up)
        self.last_collapse_std = math.nan
        self.best_knn = -math.inf
        self._bad: dict[str, bool] = {}  # layer -> currently non-finite / collapsed ("features")
        self._episode_last = -math.inf
        self._reset_epoch()

    def _spike_detector(self) -> SpikeDetector:
        return SpikeDetector(self.window, self.spike_threshold, self.warmup, z=self.z_spike)

    def _reset_epoch(self) -> None:
        self._epoch = EpochSignals()
        self._epoch_leads: list[int] = []
        self._epoch_first_led = 0

    def _emit(self, step: int, epoch: int, kind: str, layer: str, magnitude: float) -> Event:
        event = Event(step, epoch, kind, layer, float(magnitude))
        self.events.append(event)
        return event

    def _enter(self, layer: str, bad: bool) -> bool:
        """Record whether ``layer`` is in a bad state; True when it has just entered it."""
        entered = bad and not self._bad.get(layer, False)
        self._bad[layer] = bad
        return entered

    # ------------------------------------------------------------------------------------------------ steps

    def on_loss(self, step: int, epoch: int, loss: float) -> list[Event]:
        if not math.isfinite(loss):
            self._epoch.nonfinite = 1.0
            return [self._emit(step, epoch, "nonfinite", "loss", loss)] if self._enter("loss", True) else []
        self._enter("loss", False)
        if (ratio := self.loss_detector.update(loss)) is None:
            return []
        self._epoch.loss_spike_count += 1
        return [self._emit(step, epoch, "loss_spike", "loss", ratio)]

    def on_grads(self, step: int, epoch: int, norms: dict[str, float]) -> list[Event]:
        """One measured step's gradient norm per layer group."""
        self.last_norms, new, spiked = norms, [], []
        for name, norm in norms.items():
            if not math.isfinite(norm):
                self._epoch.nonfinite = 1.0
                if self._enter(name, True):
                    new.append(self._emit(step, epoch, "nonfinite", name, norm))
            else:
                self._enter(name, False)
            detector = self.grad_detectors.get(name) or self.grad_detectors.setdefault(name, self._spike_detector())
            ratio = detector.update(norm)
            self.last_ratios[name] = detector.last_ratio
            self._epoch.max_spike_ratio = _nanmax(self._epoch.max_spike_ratio, detector.last_ratio)
            if ratio is not None:
                spiked.append(name)
                self._epoch.spike_count += 1
                new.append(self._emit(step, epoch, "grad_spike", name, ratio))
        if spiked:
            self._track_episode(step, epoch, spiked)
        return new

    def nonfinite(self, names) -> bool:
        """Whether any of ``names`` was non-finite at its last measurement."""
        return any(self._bad.get(name, False) for name in names)

    def _first_last(self) -> tuple[str | None, str | None]:
        backbone = [name for name in self.groups if name != "heads"]
        return (backbone[0], backbone[-1]) if len(backbone) >= 2 else (None, None)

    def _track_episode(self, step: int, epoch: int, spiked: list[str]) -> None:
        first, last = self._first_last()
        if step - self._episode_last > self.lead_window:
            self.episodes.append({"start_step": step, "epoch": epoch, "first_layers": list(spiked), "layers": {},
                                  "lead": None})
            self._epoch.spike_episodes += 1
            self._epoch_first_led += int(first is not None and first in spiked)
        self._episode_last = step
        episode = self.episodes[-1]
        layers = episode["layers"]
        for name in spiked:
            layers.setdefault(name, step)
        if episode["lead"] is None and first in layers and last in layers:
            lead = layers[last] - layers[first]
            if abs(lead) <= self.lead_window:
                episode["lead"] = lead
                self.leads.append(lead)
                self._epoch_leads.append(lead)

    def on_collapse(self, step: int, epoch: int, std: float, dim: int) -> list[Event]:
        """SimSiam's collapse std of ``dim``-dim features: collapsed below ``collapse_threshold / sqrt(dim)``."""
        self.last_collapse_std = std
        if not math.isfinite(std):
            return []
        self._epoch.collapse_std_min = _nanmin(self._epoch.collapse_std_min, std)
        collapsed = std < self.collapse_threshold / math.sqrt(dim)
        self._epoch.collapsed = max(self._epoch.collapsed, float(collapsed))
        return [self._emit(step, epoch, "collapse", "features", std)] if self._enter("features", collapsed) else []

    # ------------------------------------------------------------------------------------------------- kNN

    def on_dense_knn(self, step: int, epoch: int, value: float) -> Event | None:
        """A dense kNN measurement (top-1 of ``dense_images`` images): a "knn_dip" event (magnitude: the drop)
        when a significant dip begins; the epoch keeps the largest drop its tests saw and the largest z."""
        dip = self.dense_knn.update(value, self.dense_images)
        if math.isfinite(self.dense_knn.last_drop):
            self._epoch.worst_knn_dip = _nanmax(self._epoch.worst_knn_dip, self.dense_knn.last_drop)
            self._epoch.knn_dip_z = _nanmax(self._epoch.knn_dip_z, self.dense_knn.last_z)
        if dip is None:
            return None
        self._epoch.knn_dip_count += 1
        return self._emit(step, epoch, "knn_dip", "dense_knn", dip[0])

    def on_epoch_knn(self, step: int, epoch: int, value: float) -> Event | None:
        """The epoch's kNN top-1: ``epoch_knn_dip`` is its drop below the best epoch so far (0 for a new best) and
        ``epoch_knn_se`` the standard error of that difference; a "knn_dip" event (layer "epoch_knn") when the
        drop is beyond ``z_critical(alpha, 1)`` of it and at least ``dip_threshold``."""
        if not math.isfinite(value):
            return None
        drop = max(0.0, self.best_knn - value) if math.isfinite(self.best_knn) else 0.0
        self._epoch.epoch_knn_se = epoch_noise(max(self.best_knn, value), self.knn_images)
        self._epoch.epoch_knn_dip = drop
        self.best_knn = max(self.best_knn, value)
        if drop > max(self.dip_threshold, self.z_epoch * self._epoch.epoch_knn_se):
            return self._emit(step, epoch, "knn_dip", "epoch_knn", drop)
        return None

    # ----------------------------------------------------------------------------------------------- epochs

    def epoch_summary(self) -> dict[str, float]:
        """This epoch's :class:`EpochSignals` as a dict (``SUMMARY_KEYS``), then a reset."""
        e = self._epoch
        if self._epoch_leads:
            e.first_layer_lead_steps = float(statistics.median(self._epoch_leads))
        if e.spike_episodes:
            e.first_layer_led_frac = self._epoch_first_led / e.spike_episodes
        summary = asdict(e)
        self._reset_epoch()
        return summary

    # ------------------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {
            "loss_detector": self.loss_detector.state_dict(),
            "grad_detectors": {name: d.state_dict() for name, d in self.grad_detectors.items()},
            "dense_knn": self.dense_knn.state_dict(),
            "best_knn": self.best_knn,
            "events": [[e.step, e.epoch, e.kind, e.layer, e.magnitude] for e in self.events],
            "leads": list(self.leads),
            "episodes": [{**ep, "layers": dict(ep["layers"])} for ep in self.episodes],
            "bad": dict(self._bad),
            "episode_last": self._episode_last,
            "epoch": {**asdict(self._epoch), "leads": list(self._epoch_leads), "first_led": self._epoch_first_led},
        }

    def load_state_dict(self, state: dict) -> None:
        self.loss_detector.load_state_dict(state["loss_detector"])
        self.grad_detectors = {}
        for name, s in state["grad_detectors"].items():
            self.grad_detectors[name] = self._spike_detector()
            self.grad_detectors[name].load_state_dict(s)
        self.dense_knn.load_state_dict(state["dense_knn"])
        self.best_knn = float(state["best_knn"])
        self.events = [Event(*e) for e in state["events"]]
        self.leads = list(state["leads"])
        self.episodes = [{**ep, "layers": dict(ep["layers"])} for ep in state["episodes"]]
        self._bad = dict(state["bad"])
        self._episode_last = state["episode_last"]
        epoch = dict(state["epoch"])
        self._epoch_leads, self._epoch_first_led = list(epoch.pop("leads")), int(epoch.pop("first_led"))
        self._epoch = EpochSignals(**{k: float(v) for k, v in epoch.items() if k in EpochSignals.__dataclass_fields__})
