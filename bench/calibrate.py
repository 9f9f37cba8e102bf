"""Calibrate the instability policy on the record: which thresholds stop the partial failures early, and only them.

A partial failure (the paper's hidden cost of instability) is a run that ends 2 or more points below the best
seed of its own cell, or below the kNN of the same network at random initialisation. For each candidate
policy (a grid over the thresholds of trainers.policy.StopPolicy that a replay can change), the enforce-mode
verdict is replayed on every run's recorded epoch summaries with the function the trainer applies
(trainers.policy.verdict, through study.replay.summary):

- recall: partial failures stopped by half the budget / partial failures;
- precision: stopped runs that are partial failures / stopped runs (a healthy run stopped at any epoch is a mistake);
- compute saved: epochs not run / all epochs.

The cells are split in two halves (seeded); the policy is chosen on one (highest recall at precision >= 0.9,
then most compute saved) and reported on the other, the held-out half, and the other way round.

    .venv/bin/python bench/calibrate.py
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import statistics
from dataclasses import replace

from study.replay import Record, first_verdict, load_record
from trainers.policy import StopPolicy

GRID = {
    "grace_epochs": [1, 2],
    "patience": [1, 2],
    "max_spikes": [0, 1, 2, 4, 8],
    "max_dips": [3, 6, 10, 1000],
    "max_knn_drop": [0.02, 0.05, 0.1],
    "max_below_init": [0.001, 0.02, 0.05, 0.1],
}


def failures(record: Record, label: str) -> dict[str, bool]:
    """Which runs the policy should stop. ``own-cell`` (the issue's partial failures): 2+ points below the best
    seed of the run's own cell, or below random init; ``counterpart``: 2+ points below the mean of the same cell
    with the frozen patch projection (the paper's comparison, bench/instability.py); ``best``: 2+ points below
    the best cell's mean at the same batch size (not worth finishing)."""
    def final(r) -> float:
        return 0.0 if math.isnan(r.final) else r.final

    axes = list(record.axes)
    out = {}
    for cell, runs in record.runs.items():
        config = dict(zip(axes, cell, strict=True))
        if label == "own-cell":
            ref = max(map(final, runs))
        elif label == "counterpart":
            twin = record.runs.get(tuple(True if a == "stop_grad_conv1" else config[a] for a in axes))
            ref = statistics.mean(map(final, twin)) if twin else math.inf
        else:
            same = [c for c in record.runs if all(c[i] == cell[i] for i, a in enumerate(axes) if a == "batch_size")]
            ref = max(record.truth(c) for c in same)
        for r in runs:
            out[r.trial_id] = ref - final(r) >= 0.02 or final(r) < r.epochs[0]["knn_top1_init"]
    return out


def stop_epoch(run, policy: StopPolicy, dim: int) -> int | None:
    judged = first_verdict(run.epochs, policy, dim)
    return judged[0] if judged else None


def rate(record: Record, cells: list[tuple], policy: StopPolicy, labels: dict[str, bool]) -> dict:
    half = record.epochs / 2
    tp = fp = caught = bad = saved = total = 0
    for cell in cells:
        for run in record.runs[cell]:
            stop = stop_epoch(run, policy, record.feature_dim)
            failure = labels[run.trial_id]
            bad += failure
            caught += failure and stop is not None and stop <= half
            tp += stop is not None and failure
            fp += stop is not None and not failure
            saved += record.epochs - (stop or record.epochs)
            total += record.epochs
    return {"recall": caught / bad if bad else math.nan, "precision": tp / (tp + fp) if tp + fp else math.nan,
            "saved": saved / total, "failures": bad, "stopped": tp + fp}


def choose(record: Record, cells: list[tuple], labels: dict[str, bool], base: StopPolicy) -> tuple[StopPolicy, dict]:
    best = None
    for values in itertools.product(*GRID.values()):
        policy = replace(base, mode="enforce", **dict(zip(GRID, values, strict=True)))
        r = rate(record, cells, policy, labels)
        ok = not math.isnan(r["precision"]) and r["precision"] >= 0.9
        key = (ok, 0.0 if math.isnan(r["recall"]) else r["recall"], r["saved"])
        if best is None or key > best[0]:
            best = (key, policy, r)
    return best[1], best[2]


def show(name: str, r: dict) -> str:
    return (f"{name}: recall {r['recall']:.2f} ({r['failures']} failures), precision {r['precision']:.2f} "
            f"({r['stopped']} stopped), compute saved {r['saved']:.0%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", default="mocov3-fmnist-grid")
    p.add_argument("--seed", type=int, default=0, help="of the split of the cells")
    p.add_argument("--label", choices=("own-cell", "counterpart", "best"), default="own-cell",
                   help="which runs count as failures (see failures())")
    args = p.parse_args()
    record = load_record(args.record, whole_grid=False)  # calibrating needs runs, not a complete grid
    labels = failures(record, args.label)
    cells = sorted(record.runs)
    random.Random(args.seed).shuffle(cells)
    halves = (sorted(cells[: len(cells) // 2]), sorted(cells[len(cells) // 2:]))
    default = replace(StopPolicy(), mode="enforce")
    print(f"record {record.name}: {sum(labels.values())} failures ({args.label}) in {len(labels)} runs")
    print(show("default policy, all runs", rate(record, cells, default, labels)))
    fields = ("grace_epochs", "patience", "max_spikes", "max_dips", "max_knn_drop", "max_below_init")
    for i, (fit, held) in enumerate((halves, halves[::-1])):
        policy, on_fit = choose(record, fit, labels, record.stopping)
        print(f"\nsplit {i + 1}: calibrated on {len(fit)} cells: "
              + ", ".join(f"{k}={getattr(policy, k)}" for k in fields))
        print("  " + show("calibration half", on_fit))
        print("  " + show("held-out half  ", rate(record, held, policy, labels)))
        print("  " + show("default, held-out", rate(record, held, default, labels)))


if __name__ == "__main__":
    main()
