"""Detectors replayed from traces (study/replay.py: detector_summaries) against the live detectors of real runs:
the Trainer in one process on real FFCV files, its per-step trace, and the same series replayed offline."""

import math

import pytest

from data.convert import convert_fashion_mnist
from study.replay import RECOMPUTED, Run, detector_summaries
from trainers.build import build_trainer
from trainers.callbacks import Trace
from trainers.config import TrainConfig
from trainers.policy import StopPolicy

TINY = dict(backbone="vit_test_patch4_32", epochs=3, batch_size=32, mlp_dim=64, dim=32, warmup_epochs=0.5,
            base_lr=3e-3, train_subset=512, knn_bank_subset=256, knn_eval_subset=128, monitor_every=1,
            monitor_bank=128, trace=True, export=False)
# Settings under which these short runs raise events (the defaults, at 1% false alarms, raise none here), and
# other settings to replay them with.
RECORDED = StopPolicy(mode="observe", alpha=0.3, spike_threshold=1.2, knn_window=2, dip_threshold=0.002)
OTHER = StopPolicy(mode="observe", alpha=0.1, spike_threshold=1.5, knn_window=3, dip_threshold=0.005)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return convert_fashion_mnist(tmp_path_factory.mktemp("data"))


def live(paths, policy: StopPolicy) -> tuple[Run, list[dict], int]:
    cfg = TrainConfig(**TINY, stopping=policy, train_path=str(paths["train"]), test_path=str(paths["test"]))
    trainer = build_trainer(cfg)
    epochs = list(trainer.epochs())
    (trace,) = [c for c in trainer.callbacks if isinstance(c, Trace)]
    run = Run("live", 0, epochs, {}, cfg.batch_size, list(trace.rows))
    return run, epochs, len(trainer.loaders.test.indices)


def same(a, b) -> bool:
    return (isinstance(a, float) and math.isnan(a) and isinstance(b, float) and math.isnan(b)) or a == b


@pytest.fixture(scope="module")
def recorded(paths):
    return live(paths, RECORDED)


def test_replay_with_the_recorded_settings_gives_exactly_the_recorded_counts(recorded):
    run, epochs, images = recorded
    replayed = detector_summaries(run, RECORDED, images)
    assert sum(e["spike_count"] + e["knn_dip_count"] for e in epochs) > 0  # something to count
    for got, want in zip(replayed, epochs, strict=True):
        assert {k: got[k] for k in RECOMPUTED if not same(got[k], want[k])} == {}


def test_replay_with_other_settings_gives_what_the_live_detectors_compute(paths, recorded):
    run, epochs, images = recorded
    other_run, other_epochs, _ = live(paths, OTHER)  # the same seeded run, watched by other detectors
    assert [r["grad_heads"] for r in other_run.trace] == [r["grad_heads"] for r in run.trace]  # same series
    replayed = detector_summaries(run, OTHER, images)
    for got, want in zip(replayed, other_epochs, strict=True):
        assert {k: got[k] for k in RECOMPUTED if not same(got[k], want[k])} == {}
    counts = lambda rows: [(r["spike_count"], r["knn_dip_count"]) for r in rows]  # noqa: E731
    assert counts(replayed) != counts(epochs)  # the settings mattered
