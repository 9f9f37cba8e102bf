"""Instability signals measured during training at low cost (MoCo v3 paper, Sec. 4.1; recipe.md, "Instability").

The paper saw instability as dips of a dense kNN monitor, preceded by a spike of the per-layer gradient
magnitude that appears first in the patch projection and reaches the last layers some (up to tens of)
iterations later. This module watches, from its training step (``trainers.trainer.StepState``: after
backward with gradients unscaled, before the optimiser step):

- per-layer-group gradient norms (:func:`layer_groups`, :func:`grad_norms`), each normalised by its own running
  median (:class:`SpikeDetector`), with spike events, spike "episodes" (which layer spiked first) and the lead in
  steps of the first layer's spike over the last block's;
- training-loss spikes (the same detector on the loss) and non-finite loss or gradients;
- representation collapse (:func:`collapse_std`, SimSiam's per-dimension std of L2-normalised outputs);
- dips of the dense kNN monitor (and of the epoch kNN) below their running best (:class:`KnnDipDetector`).

:class:`InstabilityMonitor` gathers them: every event is an :class:`Event` (step, epoch, kind, layer, magnitude)
and :meth:`InstabilityMonitor.epoch_summary` gives per-epoch numbers to report with the epoch metrics.

Cost: on a measured step, the per-tensor gradient norms come from one ``torch._foreach_norm``, the group norms,
the loss (and the losses of the unmeasured steps since the last measured one) and the collapse std are read back
in one ``.tolist()``: one device sync per measured step; unmeasured steps (``every > 1``) cost no sync at all.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, astuple

import torch
import torch.nn.functional as F
from timm.utils import unwrap_model
from torch import Tensor, nn

from trainers.events import EVENT_KINDS, SUMMARY_KEYS, EpochSignals, Event  # noqa: F401  (re-exported)

# --------------------------------------------------------------------------------------------------- detectors


class SpikeDetector:
    """Spikes of a positive series: ``value / median(previous window values) > threshold``.

    The ratio is computed once at least ``warmup`` finite values are in the window (of the last ``window`` finite
    values); non-finite values are neither judged nor added. Every finite value, spikes included, enters the
    window: the median is robust to a few of them. A non-positive median gives no ratio. ``last_ratio`` holds the
    latest value's ratio (NaN while warming up or for a non-finite value): the series normalised by its own
    running statistics.
    """

    def __init__(self, window: int = 50, threshold: float = 3.0, warmup: int = 10) -> None:
        if window < 1 or not 1 <= warmup <= window:
            raise ValueError(f"need window >= 1 and 1 <= warmup <= window, got window={window}, warmup={warmup}")
        if threshold <= 0:
            raise ValueError(f"threshold must be positive, got {threshold}")
        self.window, self.threshold, self.warmup = window, threshold, warmup
        self.values: deque[float] = deque(maxlen=window)
        self.last_ratio = math.nan

    def update(self, value: float) -> float | None:
        """Add ``value``; return its ratio to the running median when it is a spike, else None."""
        value = float(value)
        ratio = math.nan
        if math.isfinite(value):
            if len(self.values) >= self.warmup:
                median = statistics.median(self.values)
                if median > 0:
                    ratio = value / median
            self.values.append(value)
        self.last_ratio = ratio
        return ratio if ratio > self.threshold else None

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values = deque((float(v) for v in state["values"]), maxlen=self.window)
        self.last_ratio = math.nan


class KnnDipDetector:
    """Dips of an accuracy series below its running best: ``best - value > threshold`` (absolute).

    ``smooth > 1`` judges the median of the last ``smooth`` values instead of the raw value (the running best is
    then that of the smoothed series): a kNN on a small batch is noisy (binomial std sqrt(p (1 - p) / n), about
    3% for n = 256), which a raw running best turns into false dips. Non-finite values are ignored.
    ``last_dip`` is the latest (smoothed) value's drop from the best before it (0 for a new best, NaN before the
    first value).
    """

    def __init__(self, threshold: float = 0.05, smooth: int = 1) -> None:
        if threshold < 0 or smooth < 1:
            raise ValueError(f"need threshold >= 0 and smooth >= 1, got {threshold}, {smooth}")
        self.threshold, self.smooth = threshold, smooth
        self.recent: deque[float] = deque(maxlen=smooth)
        self.best = -math.inf
        self.last_dip = math.nan

    def update(self, value: float) -> float | None:
        """Add ``value``; return the drop from the running best when it exceeds the threshold, else None."""
        value = float(value)
        if not math.isfinite(value):
            return None
        self.recent.append(value)
        level = statistics.median(self.recent) if self.smooth > 1 else value
        self.last_dip = max(0.0, self.best - level) if math.isfinite(self.best) else 0.0
        self.best = max(self.best, level)
        return self.last_dip if self.last_dip > self.threshold else None

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.recent = deque((float(v) for v in state["recent"]), maxlen=self.smooth)
        self.best = float(state["best"])
        self.last_dip = math.nan


# ------------------------------------------------------------------------------------------ layers and norms


def _trainable(*modules: nn.Module | None) -> list[nn.Parameter]:
    return [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]


def layer_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameter groups whose gradient norms are watched, in forward order, heads last.

    ``model`` is a method of ``trainers.methods`` (``.backbone``, ``.projector``, maybe ``.predictor``), possibly
    wrapped in DDP / torch.compile, or a bare backbone (no "heads" group then).

    ViT (has ``patch_embed``): "patch_embed" (the patch projection, or the whole conv stem), "first_block"
    (``blocks[0]``), "middle_block" (``blocks[depth // 2]``, depth >= 3), "last_block" (``blocks[-1]``, depth >= 2),
    "heads" (projector + predictor). A frozen patch projection (``stop_grad_conv1``) has no trainable parameter,
    so "patch_embed" is left out and "first_block" becomes the first group: the first layer that gets gradients.
    The class token, position embedding and final norm are in no group.
    ResNet (timm: ``conv1``, ``bn1``, ``layer1``..``layer4``): "stem" (conv1 + bn1), "layer1".."layer4" (whole
    stages), "heads".

    Only parameters with ``requires_grad``; groups are disjoint and empty groups are left out. The first group is
    the "first layer" of :class:`InstabilityMonitor`'s lead, the last one before "heads" its "last layer".
    """
    method = unwrap_model(model)
    backbone = getattr(method, "backbone", method)
    if hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks"):
        blocks = list(backbone.blocks)
        depth = len(blocks)
        candidates = [("patch_embed", [backbone.patch_embed]), ("first_block", blocks[:1])]
        if depth >= 3:
            candidates.append(("middle_block", [blocks[depth // 2]]))
        if depth >= 2:
            candidates.append(("last_block", [blocks[-1]]))
    elif all(hasattr(backbone, name) for name in ("conv1", "layer1", "layer2", "layer3", "layer4")):
        candidates = [("stem", [backbone.conv1, getattr(backbone, "bn1", None)])]
        candidates += [(f"layer{i}", [getattr(backbone, f"layer{i}")]) for i in range(1, 5)]
    else:
        raise ValueError(f"layer_groups knows ViT (patch_embed, blocks) and ResNet (conv1, layer1..4) backbones, "
                         f"not {type(backbone).__name__}")
    if backbone is not method:
        candidates.append(("heads", [getattr(method, "projector", None), getattr(method, "predictor", None)]))
    groups: dict[str, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, modules in candidates:
        params = [p for p in _trainable(*modules) if id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            groups[name] = params
    return groups


def grad_norm_tensor(groups: dict[str, list[nn.Parameter]]) -> tuple[list[str], Tensor | None]:
    """(names, float32 tensor of their gradient norms) without a device sync; groups without any gradient are left
    out (None when none has one). Each norm is the L2 norm of the group's concatenated gradients."""
    names, grads, sizes = [], [], []
    for name, params in groups.items():
        g = [p.grad for p in params if p.grad is not None]
        if g:
            names.append(name)
            grads += g
            sizes.append(len(g))
    if not grads:
        return [], None
    device = grads[0].device
    if all(g.device == device for g in grads) and not any(g.is_sparse for g in grads):
        per_tensor = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
    else:
        per_tensor = torch.stack([torch.linalg.vector_norm(g.float()).to(device) for g in grads])
    return names, torch.stack([torch.linalg.vector_norm(s) for s in per_tensor.split(sizes)])


def grad_norms(groups: dict[str, list[nn.Parameter]]) -> dict[str, float]:
    """L2 norm of the concatenated gradients of each group (one ``.tolist()``: one device sync); groups whose
    parameters have no gradient are left out."""
    names, norms = grad_norm_tensor(groups)
    return {} if norms is None else dict(zip(names, norms.tolist(), strict=True))


def collapse_std_tensor(features: Tensor) -> Tensor:
    """:func:`collapse_std` as a 0-d float32 tensor (no device sync)."""
    z = F.normalize(features.detach().float().flatten(1), dim=1)
    return z.std(dim=0).mean()


def collapse_std(features: Tensor) -> float:
    """SimSiam's collapse measure: the mean over dimensions of the per-dimension std of the L2-normalised
    features [B, d]. About 1/sqrt(d) for healthy (isotropic) outputs, towards 0 when they collapse to a point."""
    return collapse_std_tensor(features).item()


# ---------------------------------------------------------------------------------------------------- monitor


def _nanmax(a: float, b: float) -> float:
    return b if math.isnan(a) else a if math.isnan(b) else max(a, b)


def _nanmin(a: float, b: float) -> float:
    return b if math.isnan(a) else a if math.isnan(b) else min(a, b)


class InstabilityMonitor:
    """Per-step instability signals, events and per-epoch summaries; call :meth:`on_step` as a step hook.

    - Gradient norms of :func:`layer_groups` every ``every`` steps (steps with ``step % every == 0``), one
      :class:`SpikeDetector` per group (``window``, ``spike_threshold``, ``warmup``): "grad_spike" events.
    - The loss of every step (read back at the next measured step, in the same sync): a :class:`SpikeDetector`
      ("loss_spike", layer "loss") and a non-finite check ("nonfinite", layer "loss").
    - A non-finite gradient norm gives a "nonfinite" event for that group. Non-finite and collapse events are
      emitted when the signal *enters* the bad state (a diverged run does not emit one per step); the epoch
      summary's ``nonfinite`` / ``collapsed`` flags are set by any bad measurement of the epoch. Under fp16 the
      GradScaler's skipped steps (inf gradients) show up as nonfinite too.
    - Collapse every ``every`` steps from ``state.features`` (the backbone features the method returns): a
      "collapse" event when ``collapse_std < collapse_threshold / sqrt(d)``, i.e. ``collapse_threshold`` is a
      fraction of the healthy 1/sqrt(d) (default 0.1). Backbone features carry a common component and read below
      1/sqrt(d) even when healthy (a freshly initialised ViT's class tokens: about 0.2-0.3 of it; MoCo v3 on
      Fashion-MNIST at a high learning rate, training well: 0.05 of it), hence 0.01. A collapsed run is far
      below (identical outputs: 0; outputs within 1e-3 of one point: about 0.001 of it).
    - Spike episodes (``episodes``: dicts with start_step, epoch, first_layers, layers = first spike step per
      group, lead): a grad spike more than ``lead_window`` measured steps after the previous one opens an
      episode; its ``first_layers`` are the groups spiking at its first step. The lead of an episode, once both
      have spiked in it: first spike step of the last backbone group (``layer_groups``' last before "heads") minus
      that of the first group, kept when at most ``lead_window`` in size (negative when the last block spiked
      first); ``leads`` keeps them, one per episode at most. With ``every > 1`` leads are multiples of ``every``.
    - :meth:`on_dense_knn` / :meth:`on_epoch_knn`: "knn_dip" events (layer "dense_knn" / "epoch_knn") when the
      value drops more than ``dip_threshold`` below its running best (dense values smoothed over ``knn_smooth``).

    In DDP every rank sees the same (all-reduced) gradients but its own loss and features; report rank 0's.
    """

    def __init__(
        self,
        window: int = 50,
        spike_threshold: float = 3.0,
        dip_threshold: float = 0.05,
        collapse_threshold: float = 0.01,
        every: int = 1,
        warmup: int = 10,
        lead_window: int = 50,
        knn_smooth: int = 1,
    ) -> None:
        if every < 1 or lead_window < 0 or collapse_threshold < 0:
            raise ValueError(f"need every >= 1, lead_window >= 0 and collapse_threshold >= 0, got {every}, "
                             f"{lead_window}, {collapse_threshold}")
        self.window, self.spike_threshold, self.warmup = window, spike_threshold, warmup
        self.dip_threshold, self.collapse_threshold = dip_threshold, collapse_threshold
        self.every, self.lead_window = every, lead_window
        self.loss_detector = SpikeDetector(window, spike_threshold, warmup)
        self.grad_detectors: dict[str, SpikeDetector] = {}
        self.dense_knn = KnnDipDetector(dip_threshold, knn_smooth)
        self.epoch_knn = KnnDipDetector(dip_threshold)
        self.events: list[Event] = []
        self.leads: list[int] = []
        self.episodes: list[dict] = []
        self.last_norms: dict[str, float] = {}  # latest measured gradient norm per group
        self.last_ratios: dict[str, float] = {}  # ... divided by its running median (NaN while warming up)
        self.last_collapse_std = math.nan
        self._model: nn.Module | None = None
        self._groups: dict[str, list[nn.Parameter]] = {}
        self._pending: list[tuple[int, int, Tensor]] = []  # (step, epoch, loss) not read back yet
        self._bad: dict[str, bool] = {}  # layer -> currently non-finite / collapsed ("features")
        self._episode_last = -math.inf
        self._reset_epoch()

    # ------------------------------------------------------------------------------------------------ steps

    def _reset_epoch(self) -> None:
        self._epoch = EpochSignals()
        self._epoch_leads: list[int] = []  # the leads of this epoch's episodes
        self._epoch_first_led = 0  # this epoch's episodes that the first group opened

    def _emit(self, new: list[Event], step: int, epoch: int, kind: str, layer: str, magnitude: float) -> None:
        event = Event(step, epoch, kind, layer, float(magnitude))
        self.events.append(event)
        new.append(event)

    def _enter(self, layer: str, bad: bool) -> bool:
        """Record whether ``layer`` is in a bad state; True when it has just entered it."""
        entered = bad and not self._bad.get(layer, False)
        self._bad[layer] = bad
        return entered

    def _check_loss(self, new: list[Event], step: int, epoch: int, loss: float) -> None:
        if not math.isfinite(loss):
            self._epoch.nonfinite = 1.0
            if self._enter("loss", True):
                self._emit(new, step, epoch, "nonfinite", "loss", loss)
            return
        self._enter("loss", False)
        if (ratio := self.loss_detector.update(loss)) is not None:
            self._epoch.loss_spike_count += 1
            self._emit(new, step, epoch, "loss_spike", "loss", ratio)

    def _check_grads(self, new: list[Event], step: int, epoch: int, norms: dict[str, float]) -> None:
        self.last_norms = norms
        spiked = []
        for name, norm in norms.items():
            if not math.isfinite(norm):
                self._epoch.nonfinite = 1.0
                if self._enter(name, True):
                    self._emit(new, step, epoch, "nonfinite", name, norm)
            else:
                self._enter(name, False)
            detector = self.grad_detectors.setdefault(name, SpikeDetector(self.window, self.spike_threshold,
                                                                          self.warmup))
            ratio = detector.update(norm)
            self.last_ratios[name] = detector.last_ratio
            self._epoch.max_spike_ratio = _nanmax(self._epoch.max_spike_ratio, detector.last_ratio)
            if ratio is not None:
                spiked.append(name)
                self._epoch.spike_count += 1
                self._emit(new, step, epoch, "grad_spike", name, ratio)
        if spiked:
            self._track_episode(step, epoch, spiked)

    def _first_last(self) -> tuple[str | None, str | None]:
        backbone = [name for name in self._groups if name != "heads"]
        if len(backbone) < 2:
            return None, None
        return backbone[0], backbone[-1]

    def _track_episode(self, step: int, epoch: int, spiked: list[str]) -> None:
        """Spikes closer than ``lead_window`` steps to the previous one belong to the same episode; an episode's
        lead is recorded once both its first and last backbone groups have spiked, ``lead_window`` apart at most."""
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

    def _check_collapse(self, new: list[Event], step: int, epoch: int, std: float, dim: int) -> None:
        self.last_collapse_std = std
        if not math.isfinite(std):
            return
        self._epoch.collapse_std_min = _nanmin(self._epoch.collapse_std_min, std)
        collapsed = std < self.collapse_threshold / math.sqrt(dim)
        self._epoch.collapsed = max(self._epoch.collapsed, float(collapsed))
        if self._enter("features", collapsed):
            self._emit(new, step, epoch, "collapse", "features", std)

    def _measure(self, state=None) -> list[Event]:
        """Read back the pending losses (and, given ``state``, the gradient norms and collapse std) in one sync."""
        pending, self._pending = self._pending, []
        if not pending and state is None:
            return []
        names, norms, features = [], None, None
        if state is not None:
            model = unwrap_model(state.model)
            if model is not self._model:
                self._model, self._groups = model, layer_groups(model)
            names, norms = grad_norm_tensor(self._groups)
            features = state.features if state.features is not None and state.features.ndim >= 2 else None
        parts = [loss.reshape(1).float() for _, _, loss in pending]
        if norms is not None:
            parts.append(norms)
        if features is not None:
            parts.append(collapse_std_tensor(features).reshape(1))
        device = parts[0].device
        values = torch.cat([p.to(device) for p in parts]).tolist()
        new: list[Event] = []
        for (step, epoch, _), loss in zip(pending, values, strict=False):
            self._check_loss(new, step, epoch, loss)
        if state is not None:
            rest = values[len(pending):]
            self._check_grads(new, state.step, state.epoch, dict(zip(names, rest, strict=False)))
            if features is not None:
                self._check_collapse(new, state.step, state.epoch, rest[-1], features.flatten(1).shape[1])
        return new

    def on_step(self, state) -> list[Event]:
        """Step hook (``trainers.trainer.StepState``): returns the events found in this call (loss events of the
        unmeasured steps since the last measured one carry their own step)."""
        self._pending.append((state.step, state.epoch, state.loss.detach()))
        if state.step % self.every:
            return []
        return self._measure(state)

    __call__ = on_step

    @property
    def nonfinite_gradients(self) -> bool:
        """Whether a layer group's gradient norm was non-finite at the last measured step."""
        return any(self._bad.get(name, False) for name in self._groups)

    def flush(self) -> list[Event]:
        """Check the losses of unmeasured steps still pending (one sync); :meth:`epoch_summary` calls it."""
        return self._measure()

    # ------------------------------------------------------------------------------------------------- kNN

    def on_dense_knn(self, step: int, epoch: int, value: float) -> Event | None:
        """A dense kNN monitor value (``DenseKnnMonitor.update``'s return): a "knn_dip" event when the (smoothed)
        value is more than ``dip_threshold`` below the running best."""
        dip = self.dense_knn.update(value)
        if math.isfinite(self.dense_knn.last_dip):
            self._epoch.worst_knn_dip = _nanmax(self._epoch.worst_knn_dip, self.dense_knn.last_dip)
        if dip is None:
            return None
        self._epoch.knn_dip_count += 1
        new: list[Event] = []
        self._emit(new, step, epoch, "knn_dip", "dense_knn", dip)
        return new[0]

    def on_epoch_knn(self, step: int, epoch: int, value: float) -> Event | None:
        """The epoch's kNN top-1: a "knn_dip" event (layer "epoch_knn") when it is more than ``dip_threshold``
        below the best epoch so far; ``epoch_knn_dip`` of the summary is its drop (0 for a new best)."""
        dip = self.epoch_knn.update(value)
        if math.isfinite(self.epoch_knn.last_dip):
            self._epoch.epoch_knn_dip = self.epoch_knn.last_dip
        if dip is None:
            return None
        new: list[Event] = []
        self._emit(new, step, epoch, "knn_dip", "epoch_knn", dip)
        return new[0]

    # ----------------------------------------------------------------------------------------------- epochs

    def epoch_summary(self) -> dict[str, float]:
        """This epoch's :class:`EpochSignals` as a dict (``SUMMARY_KEYS``), then a reset; :meth:`flush` first."""
        self.flush()
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
        """Everything but the model reference, as plain Python values (pending losses are checked first)."""
        self.flush()
        return {
            "loss_detector": self.loss_detector.state_dict(),
            "grad_detectors": {name: d.state_dict() for name, d in self.grad_detectors.items()},
            "dense_knn": self.dense_knn.state_dict(),
            "epoch_knn": self.epoch_knn.state_dict(),
            "events": [astuple(e) for e in self.events],
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
            self.grad_detectors[name] = SpikeDetector(self.window, self.spike_threshold, self.warmup)
            self.grad_detectors[name].load_state_dict(s)
        self.dense_knn.load_state_dict(state["dense_knn"])
        self.epoch_knn.load_state_dict(state["epoch_knn"])
        self.events = [Event(*e) for e in state["events"]]
        self.leads = list(state["leads"])
        self.episodes = [{**ep, "layers": dict(ep["layers"])} for ep in state["episodes"]]
        self._bad = dict(state["bad"])
        self._episode_last = state["episode_last"]
        epoch = dict(state["epoch"])
        self._epoch_leads, self._epoch_first_led = list(epoch.pop("leads")), int(epoch.pop("first_led"))
        self._epoch = EpochSignals(**{k: float(v) for k, v in epoch.items() if k in SUMMARY_KEYS})
        self._pending = []
