"""What each instability detector's false alarms are, and what it catches: on synthetic stationary series at
several batch sizes, and on the recorded grid's real runs (their detectors recomputed from the per-step traces
with the default settings).

    .venv/bin/python bench/detectors.py            # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study.replay import load_record
from trainers.detectors import DipDetector, SpikeDetector, epoch_noise, z_critical
from trainers.policy import StopPolicy


def synthetic(policy: StopPolicy, epochs: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    print(f"synthetic stationary series, {epochs} epochs each (alpha {policy.alpha} per epoch and detector):")
    tests = 16
    for batch in (32, 256, 4096):
        d = DipDetector(policy.knn_window, policy.alpha, tests, policy.dip_threshold)
        values = rng.binomial(batch, 0.7, tests * epochs) / batch
        alarms = np.array([d.update(v, batch) is not None for v in values]).reshape(epochs, tests)[2:]
        caught = []
        for _ in range(50):
            d = DipDetector(policy.knn_window, policy.alpha, tests, policy.dip_threshold)
            for v in rng.binomial(batch, 0.7, 40) / batch:
                d.update(v, batch)
            dip = 3 * math.sqrt(0.21 / batch)
            low = rng.binomial(batch, 0.7 - dip, 20) / batch
            caught.append(next((i + 1 for i, v in enumerate(low) if d.update(v, batch)), 99))
        beyond = (alarms.sum(1) > policy.max_dips).mean()
        print(f"  dense kNN at batch {batch:>4} (noise {100 * math.sqrt(0.21 / batch):.1f} points): epochs with a dip "
              f"{alarms.any(1).mean():.3f}, with more than {policy.max_dips} {beyond:.4f}"
              f"; a dip of 3x the noise caught after {np.median(caught):.0f} measurements (median of 50, "
              f"90th percentile {np.percentile(caught, 90):.0f})")
    tests = 100
    for sd in (0.1, 0.5, 1.0):
        d = SpikeDetector(50, policy.spike_threshold, 10, policy.alpha, tests)
        values = rng.lognormal(0.0, sd, tests * epochs)
        alarms = np.array([d.update(v) is not None for v in values]).reshape(epochs, tests)[2:]
        print(f"  gradient norm, log-sd {sd}: epochs with a spike {alarms.any(1).mean():.3f}")
    for images in (2000, 10000):
        print(f"  epoch kNN on {images} images at 70%: a drop counts beyond "
              f"{100 * max(policy.max_knn_drop, z_critical(policy.alpha, 1) * epoch_noise(0.7, images)):.1f} points")


def recorded(policy: StopPolicy, name: str) -> None:
    record = load_record(name, whole_grid=False)
    played = record.with_detectors(policy)
    axes = list(record.axes)
    print(f"\nrecord {record.name} ({sum(map(len, record.runs.values()))} runs, default detectors from the traces), "
          "epochs after the first with a detection, by base lr:")
    rows: dict = {}
    for cell, runs in played.runs.items():
        lr = dict(zip(axes, cell, strict=True)).get("base_lr")
        for run in runs:
            for e in run.epochs[1:]:
                r = rows.setdefault(lr, [0, 0, 0, 0, 0])
                r[0] += 1
                r[1] += e["knn_dip_count"] > 0
                r[2] += e["knn_dip_count"] > policy.max_dips
                r[3] += e["spike_episodes"] > policy.max_spikes
                r[4] += (e["epoch_knn_dip"] or 0) > max(policy.max_knn_drop,
                                                         z_critical(policy.alpha, 1) * (e["epoch_knn_se"] or 0))
    print("  base lr | epochs | any dense dip | > max_dips | > max_spikes | kNN drop beyond noise")
    for lr, (n, dip, dips, spikes, drop) in sorted(rows.items()):
        print(f"  {lr:>7} | {n:>6} | {dip / n:>13.2f} | {dips / n:>10.2f} | {spikes / n:>12.2f} | {drop / n:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", default="mocov3-fmnist-grid")
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    policy = replace(StopPolicy(), mode="enforce")
    synthetic(policy, args.epochs, args.seed)
    recorded(policy, args.record)


if __name__ == "__main__":
    main()
