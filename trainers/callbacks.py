"""What a run watches and does beside its training step, one :class:`~trainers.trainer.Callback` each.

Order matters and is the order of :func:`default_callbacks`: the dense kNN monitor measures first (its value
goes into the step state), the instability signals read it, the online probe trains, the trace records what
the signals measured, and the verdict judges the epoch's metrics last.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from trainers import distributed as dist
from trainers.config import TrainConfig
from trainers.linear_probe import OnlineLinearProbe
from trainers.monitor import DenseKnnMonitor
from trainers.policy import StopPolicy, history_entry, verdict, verdict_report
from trainers.signals import InstabilityMonitor
from trainers.trainer import Callback, Loaders, StepState, autocast_dtype

TRACE_FILE = "trace.parquet"


class DenseKnn(Callback):
    """The paper's dense kNN monitor (trainers/monitor.py): the batch's features against a FIFO bank of recent
    ones every ``monitor.every`` steps; ``dense_knn_last`` / ``dense_knn_min`` of the epoch."""

    name = "monitor"

    def __init__(self, monitor: DenseKnnMonitor) -> None:
        self.monitor, self.values = monitor, []

    def on_step(self, state: StepState) -> None:
        state.dense_knn = self.monitor.update(state.step, state.features.float(), state.labels)
        if state.dense_knn is not None:
            self.values.append(state.dense_knn)

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        if self.values:
            metrics.update(dense_knn_last=self.values[-1], dense_knn_min=min(self.values))
        self.values = []

    def state_dict(self) -> dict:
        return {**self.monitor.state_dict(), "epoch_values": list(self.values)}  # the epoch's so far

    def load_state_dict(self, state: dict) -> None:
        self.monitor.load_state_dict(state)
        self.values = list(state.get("epoch_values", []))


class Signals(Callback):
    """The instability signals (trainers/signals.py): gradient norms per layer group, spikes, loss, collapse and
    kNN dips; the epoch's summary and its new events go into the metrics.

    ``halt_on_nonfinite``: end training at the first measured step with non-finite gradients (they are
    all-reduced, so every rank halts at the same step). Off under fp16, whose grad scaler skips inf steps by
    design: there a diverged run is caught by the epoch's verdict instead.
    """

    name = "signals"

    def __init__(self, monitor: InstabilityMonitor, halt_on_nonfinite: bool) -> None:
        self.monitor, self.halt_on_nonfinite = monitor, halt_on_nonfinite
        self.reported, self.last_step = 0, -1  # events already reported; the epoch kNN's step

    def on_step(self, state: StepState) -> None:
        self.last_step = state.step
        self.monitor.on_step(state)
        if state.dense_knn is not None:
            self.monitor.on_dense_knn(state.step, state.epoch, state.dense_knn)
        state.halt |= self.halt_on_nonfinite and self.monitor.nonfinite_gradients

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        if math.isfinite(metrics["knn_top1"]):
            self.monitor.on_epoch_knn(self.last_step, epoch, metrics["knn_top1"])
        metrics.update(self.monitor.epoch_summary())
        metrics["events"] = [{**asdict(e), "epoch": e.epoch + 1} for e in self.monitor.events[self.reported:]]
        self.reported = len(self.monitor.events)

    def state_dict(self) -> dict:
        return {**self.monitor.state_dict(), "reported": self.reported, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.monitor.load_state_dict(state)
        self.reported = state.get("reported", len(self.monitor.events))  # mid-epoch: this epoch's are not yet
        self.last_step = state.get("last_step", -1)


class OnlineProbe(Callback):
    """A linear head trained on the detached features during pretraining; ``online_probe_top1`` is its accuracy
    on each batch before it trains on it, averaged over the epoch."""

    name = "probe"

    def __init__(self, probe: OnlineLinearProbe) -> None:
        self.probe, self.accuracies = probe, []

    def on_step(self, state: StepState) -> None:
        self.accuracies.append(self.probe.accuracy(state.features, state.labels))
        self.probe.step(state.features, state.labels)

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        metrics["online_probe_top1"] = sum(self.accuracies) / len(self.accuracies)
        self.accuracies = []

    def state_dict(self) -> dict:
        return {"head": self.probe.state_dict(), "optimizer": self.probe.optimizer.state_dict(),
                "accuracies": list(self.accuracies)}

    def load_state_dict(self, state: dict) -> None:
        self.probe.load_state_dict(state["head"])
        self.probe.optimizer.load_state_dict(state["optimizer"])
        self.accuracies = list(state.get("accuracies", []))


class Trace(Callback):
    """Per measured step: each layer group's gradient norm, its ratio to the running median, and the dense kNN
    where it was measured; written as ``trace.parquet`` next to each checkpoint."""

    name = "trace"

    def __init__(self, signals: InstabilityMonitor) -> None:
        self.signals, self.rows = signals, []

    def on_step(self, state: StepState) -> None:
        if state.step % self.signals.every == 0:
            self.rows.append({
                "step": state.step, "epoch": state.epoch + 1,
                **{f"grad_{k}": v for k, v in self.signals.last_norms.items()},
                **{f"ratio_{k}": v for k, v in self.signals.last_ratios.items()},
                "dense_knn": math.nan if state.dense_knn is None else state.dense_knn})

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])

    def save_files(self, directory: Path) -> None:
        pq.write_table(pa.Table.from_pylist(self.rows), directory / TRACE_FILE)


class Verdict(Callback):
    """The instability policy's verdict on the run so far (trainers/policy.py): ``verdict``, ``verdict_reason``
    and ``stopped`` (in ``enforce`` mode a verdict ends the run after this epoch). Rank 0's signals decide
    for every rank."""

    name = "verdict"

    def __init__(self, policy: StopPolicy, device) -> None:
        self.policy, self.device, self.history = policy, device, []

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        self.history.append(history_entry(metrics))
        judged = dist.broadcast_object(verdict(self.history, self.policy), self.device)
        metrics.update(verdict_report(judged, self.policy))

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])


def run_shape(cfg: TrainConfig, loaders: Loaders) -> dict:
    """How many tests each detector runs per epoch and on how many images (trainers/detectors.py)."""
    steps = len(loaders.train)
    return {"steps_per_epoch": steps, "dense_tests": -(-steps // cfg.monitor_every) if cfg.monitor_every else 1,
            "dense_images": cfg.batch_size, "knn_images": len(getattr(loaders.test, "indices", ()))}


def default_callbacks(cfg: TrainConfig, loaders: Loaders, features: int, device: torch.device) -> list[Callback]:
    """The callbacks ``cfg`` asks for, in the order they must run, for a run on ``loaders`` whose backbone gives
    ``features`` features, on ``device``."""
    callbacks: list[Callback] = []
    if cfg.monitor_every:
        callbacks.append(DenseKnn(DenseKnnMonitor(cfg.monitor_bank, loaders.num_classes, cfg.monitor_every,
                                                  k=cfg.knn_k, temperature=cfg.knn_t)))
    signals = None
    if cfg.signals_every:
        signals = InstabilityMonitor(every=cfg.signals_every, **run_shape(cfg, loaders),
                                     **cfg.stopping.monitor_options())
        # fp16's grad scaler skips the steps whose gradients overflow: not a divergence to halt on
        fp16 = autocast_dtype(cfg.precision, device) == torch.float16
        callbacks.append(Signals(signals, cfg.stopping.mode == "enforce" and not fp16))
    if cfg.online_probe:
        callbacks.append(OnlineProbe(OnlineLinearProbe(features, loaders.num_classes).to(device)))
    if cfg.trace and signals is not None and dist.rank() == 0:
        callbacks.append(Trace(signals))
    callbacks.append(Verdict(cfg.stopping, device))
    return callbacks
