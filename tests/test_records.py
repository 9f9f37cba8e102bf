"""A new metric is one field of an EpochRecord and its producer: a callback measures it in a real Trainer run,
and the real results writer gives it a typed column of the epochs table with the values the run reported."""

import math
from dataclasses import dataclass

import pyarrow as pa
import torch
from test_results_writer import Clock, make_spec, make_trial
from test_trainer import cfg  # noqa: F401  (the tiny config, a fixture)

from study import results
from study.results.schema import EPOCHS_SCHEMA, epochs_schema
from study.results.writer import ResultsWriter
from trainers.records import NAN, EpochRecord
from trainers.trainer import Callback, StepState, Trainer


@dataclass
class WithGradNorm(EpochRecord):
    grad_norm: float = NAN  # the new field: the mean gradient norm of the backbone over the epoch's steps


class GradNorm(Callback):
    """Its producer."""

    name = "grad_norm"

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_step(self, state: StepState) -> None:
        grads = [p.grad for p in state.model.backbone.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        metrics["grad_norm"], self.norms = sum(self.norms) / len(self.norms), []


def test_a_new_metric_is_a_field_and_its_producer(cfg, tmp_path):  # noqa: F811
    trainer = Trainer(cfg, callbacks=[GradNorm()], record=WithGradNorm)
    reports = list(trainer.epochs())
    assert [r["epoch"] for r in reports] == [1, 2] and all(r["grad_norm"] > 0 for r in reports)
    assert all(math.isnan(r["online_probe_top1"]) for r in reports)  # no OnlineProbe callback: its default

    spec = make_spec(tmp_path)
    writer = ResultsWriter(spec, clock=Clock(), record=WithGradNorm)
    trial = make_trial("t0", {"base_lr": 1e-3, "wd": 0.0}, tmp_path)
    for report in reports:
        writer.on_trial_result(0, [trial], trial, {**report, "time_total_s": 1.0})
    writer.on_trial_complete(0, [trial], trial)
    writer.on_experiment_end([trial])
    epochs = results.open(spec.study_dir).table("epochs")
    assert epochs.schema.field("grad_norm").type == pa.float64()
    assert epochs.column("grad_norm").to_pylist() == [r["grad_norm"] for r in reports]
    assert epochs.column("loss").to_pylist() == [r["loss"] for r in reports]
    assert "grad_norm" not in EPOCHS_SCHEMA.names and epochs_schema(WithGradNorm).names[-1] == "nonfinite"
    trials = results.open(spec.study_dir).table("trials").to_pylist()
    assert trials[0]["epochs_done"] == 2 and trials[0]["knn_top1"] == reports[-1]["knn_top1"]
