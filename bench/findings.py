"""The paper's instability findings (MoCo v3, Sec. 4.1-4.2), measured on the recorded grid of real runs.

Reads the record (bench/records/NAME: trials, epochs, events, traces; bench/record.py made it) and prints:

1. seed-to-seed noise (std of the final kNN top-1 over the seeds of a cell) against the accuracy lost to
   instability (a cell's mean below the same cell with the frozen patch projection, where the free one was
   flagged unstable), as the paper's 0.1-0.3% against 1-3%;
2. the batch x base-lr table of mean final kNN, cells whose runs the policy flagged (observe mode) marked;
3. the frozen patch projection's gain per learning rate (and its effect on spike episodes);
4. how far the first layer's gradient spikes lead the last block's (steps), from the events;
5. RankMe (label-free) against kNN: rank correlation across runs and across cells;

and draws them in one figure (bench/figures/record_findings.png).

    .venv/bin/python bench/findings.py                  # the shipped record
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from study.replay import first_verdict, load_record
from trainers.policy import StopPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from instability import leads  # bench/instability.py: one definition of the lead-time rule

RECORDS = Path(__file__).with_name("records")


def load(folder: Path) -> tuple[list[dict], dict, list[dict], dict]:
    trials = [t for t in pq.read_table(folder / "trials.parquet").to_pylist() if t["status"] == "completed"]
    epochs: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(pq.read_table(folder / "epochs.parquet").to_pylist(), key=lambda r: r["epoch"]):
        epochs[r["trial_id"]].append(r)
    events = pq.read_table(folder / "events.parquet").to_pylist()
    traces: dict[str, list[dict]] = defaultdict(list)
    for r in pq.read_table(folder / "traces.parquet").to_pylist():
        traces[r["trial_id"]].append(r)
    return trials, epochs, events, traces


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among float metrics)."""
    rx, ry = (np.argsort(np.argsort(np.asarray(v, dtype=float))) for v in (x, y))
    return float(np.corrcoef(rx, ry)[0, 1])


def final(t: dict) -> float:
    return 0.0 if t["knn_top1"] is None or math.isnan(t["knn_top1"]) else t["knn_top1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", default="mocov3-fmnist-grid")
    p.add_argument("--figure", default="bench/figures/record_findings.png")
    p.add_argument("--lead-window", type=int, default=20, help="steps a first-layer spike may precede")
    args = p.parse_args()
    trials, epochs, events, traces = load(RECORDS / args.record)
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for t in trials:
        cells[(t["base_lr"], t["batch_size"], t["stop_grad_conv1"])].append(t)
    lrs = sorted({c[0] for c in cells})
    batches = sorted({c[1] for c in cells})
    mean = {c: statistics.mean(final(t) for t in ts) for c, ts in cells.items()}
    # Unstable = what the default policy says, its detectors recomputed from the runs' traces (docs/instability.md).
    record = load_record(str(RECORDS / args.record))
    policy = replace(StopPolicy(), mode="enforce")
    detected = {run.trial_id: run.epochs for runs in record.with_detectors(policy).runs.values() for run in runs}
    epochs = {tid: detected.get(tid, rows) for tid, rows in epochs.items()}
    verdicts = {t["trial_id"]: first_verdict(epochs[t["trial_id"]], policy, record.feature_dim) for t in trials}
    flagged = {c: sum(verdicts[t["trial_id"]] is not None for t in ts) for c, ts in cells.items()}
    seconds = sum(r["epoch_time_s"] or 0 for rs in epochs.values() for r in rs)
    print(f"record {args.record}: {len(trials)} runs in {len(cells)} cells, {len(next(iter(epochs.values())))} "
          f"epochs each; {seconds / 3600:.2f} h of recorded epochs")
    dips = sum(any(r["knn_dip_count"] > StopPolicy().max_dips for r in epochs[t["trial_id"]]) for t in trials)
    print(f"runs with an epoch of more than {StopPolicy().max_dips} significant dense-kNN dips (the default "
          f"policy's rule): {dips} of {len(trials)}")

    # 1. seed noise against the cost of instability
    noise = {c: statistics.stdev(final(t) for t in ts) for c, ts in cells.items() if len(ts) > 1}
    stable = [c for c in noise if not flagged[c]]
    print("\n1. seed-to-seed noise vs accuracy lost to instability (kNN points)")
    print(f"   std over seeds, median over cells: all {100 * statistics.median(noise.values()):.2f}; cells no run of "
          f"which was flagged {100 * statistics.median([noise[c] for c in stable]) if stable else math.nan:.2f} "
          f"({len(stable)} cells)")
    for c, ts in cells.items():
        if len(ts) > 2:
            print(f"   {len(ts)} seeds at base_lr {c[0]:g}, batch {c[1]}, frozen {c[2]}: "
                  f"{', '.join(f'{100 * final(t):.1f}' for t in sorted(ts, key=lambda t: t['seed']))} "
                  f"(std {100 * noise[c]:.2f})")
    # The paper measures the cost of instability by what the stabiliser (the frozen patch projection) gives back:
    # the free projection's shortfall against the frozen one at the highest rates.
    high = lrs[-2:]
    lost = [mean[(lr, b, True)] - mean[(lr, b, False)] for lr in high for b in batches
            if (lr, b, True) in mean and (lr, b, False) in mean]
    if lost:
        print(f"   free vs frozen patch projection at base lr {', '.join(f'{lr:g}' for lr in high)}: the free one "
              f"ends {100 * statistics.mean(lost):.2f} points lower on average ({len(lost)} cells, "
              f"{100 * min(lost):+.2f} .. {100 * max(lost):+.2f}); best cell vs the highest rate's best: "
              f"{100 * (max(mean.values()) - max(v for c, v in mean.items() if c[0] == lrs[-1])):.1f} points")
    partial = [t for c, ts in cells.items() for t in ts if max(map(final, ts)) - final(t) >= 0.02]
    print(f"   partial failures (2+ points below the best seed of their cell): {len(partial)} of {len(trials)} runs")

    # 2. batch x lr
    print("\n2. mean final kNN top-1 (%) by batch x base lr; * = n of the cell's runs flagged unstable")
    for frozen in (False, True):
        print(f"   frozen patch projection {frozen}:")
        print("   " + f"{'batch':>6}" + "".join(f"{lr:>11g}" for lr in lrs))
        for b in batches:
            row = "".join(f"{100 * mean[(lr, b, frozen)]:8.1f}{'*' * min(3, flagged[(lr, b, frozen)]):<3}"
                          if (lr, b, frozen) in mean else f"{'-':>11}" for lr in lrs)
            print(f"   {b:>6}{row}")

    # 3. the frozen patch projection
    print("\n3. frozen patch projection: gain in mean final kNN (points) and spike episodes (free -> frozen)")
    for b in batches:
        parts = []
        for lr in lrs:
            free, frozen = cells.get((lr, b, False), []), cells.get((lr, b, True), [])
            if free and frozen:
                spikes = [sum(t["spike_episodes"] for t in ts) for ts in (free, frozen)]
                parts.append(f"{lr:g}: {100 * (mean[(lr, b, True)] - mean[(lr, b, False)]):+.1f} "
                             f"({spikes[0]:.0f}->{spikes[1]:.0f})")
        print(f"   batch {b}: " + "; ".join(parts))

    # 4. first-layer lead
    lead_last: list[int | None] = []
    for t in trials:
        ev = [e for e in events if e["trial_id"] == t["trial_id"]]
        lead_last += leads(traces.get(t["trial_id"], []), ev, args.lead_window)["last_block"]
    known = [x for x in lead_last if x is not None]
    print(f"\n4. last-block gradient spikes preceded by a patch-projection spike within {args.lead_window} steps: "
          f"{len(known)} of {len(lead_last)}" + (f"; lead median {statistics.median(known):.0f} steps, "
                                                 f"quartiles {np.quantile(known, 0.25):.0f}-"
                                                 f"{np.quantile(known, 0.75):.0f}" if known else ""))

    # 5. RankMe
    finite = [t for t in trials if t["rankme"] is not None and math.isfinite(t["rankme"])]
    by_cell = [(statistics.mean(t["rankme"] for t in ts), mean[c]) for c, ts in cells.items()
               if all(t["rankme"] is not None and math.isfinite(t["rankme"]) for t in ts)]
    rho_runs = spearman([t["rankme"] for t in finite], [final(t) for t in finite])
    rho_cells = spearman(*zip(*by_cell, strict=True))
    print(f"\n5. RankMe vs kNN top-1 (Spearman): across runs {rho_runs:+.2f} ({len(finite)} runs), across cells "
          f"{rho_cells:+.2f} ({len(by_cell)} cells)")

    figure = plot(cells, mean, flagged, lrs, batches, trials, traces, events, Path(args.figure))
    print(f"\nfigure: {figure}")


def lr_axis(ax, ylabel: str, title: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel("base lr")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def plot(cells, mean, flagged, lrs, batches, trials, traces, events, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(22, 4.6))
    ax = axes[0]
    for b in batches:
        for frozen, ls in ((False, "-"), (True, "--")):
            keys = [(lr, b, frozen) for lr in lrs if (lr, b, frozen) in cells]
            ys = [100 * mean[k] for k in keys]
            err = [100 * statistics.stdev(final(t) for t in cells[k]) if len(cells[k]) > 1 else 0 for k in keys]
            line = ax.errorbar([k[0] for k in keys], ys, yerr=err, ls=ls, marker="o", capsize=3,
                               label=f"batch {b}, frozen {frozen}")
            bad = [(k[0], 100 * mean[k]) for k in keys if flagged[k]]
            if bad:
                ax.scatter(*zip(*bad, strict=True), s=120, facecolors="none", edgecolors=line[0].get_color())
    lr_axis(ax, "final kNN top-1 (%), mean ± std over seeds", "batch x lr (circled: flagged unstable)")
    ax = axes[1]
    for b in batches:
        gains = [(lr, 100 * (mean[(lr, b, True)] - mean[(lr, b, False)])) for lr in lrs
                 if (lr, b, True) in mean and (lr, b, False) in mean]
        ax.plot(*zip(*gains, strict=True), marker="o", label=f"batch {b}")
    ax.axhline(0, color="k", lw=0.7)
    lr_axis(ax, "frozen - free patch projection (kNN points)", "gain of the frozen patch projection")
    ax = axes[2]
    finite = [t for t in trials if t["rankme"] is not None and math.isfinite(t["rankme"])]
    ax.scatter([t["rankme"] for t in finite], [100 * final(t) for t in finite],
               c=[math.log10(t["base_lr"]) for t in finite], cmap="viridis", s=18)
    ax.set_xlabel("final RankMe (no labels)")
    ax.set_ylabel("final kNN top-1 (%)")
    ax.set_title("RankMe vs kNN (colour: log10 base lr)", fontsize=9)
    ax = axes[3]
    free = [t for t in trials if not t["stop_grad_conv1"] and traces.get(t["trial_id"])]
    worst = max(free, key=lambda t: (t["spike_episodes"], t["base_lr"]))
    trace = traces[worst["trial_id"]]
    for layer, colour in (("patch_embed", "tab:orange"), ("last_block", "tab:purple")):
        steps = [r["step"] for r in trace if r.get(f"grad_{layer}") is not None]
        ax.plot(steps, [r[f"grad_{layer}"] for r in trace if r.get(f"grad_{layer}") is not None], lw=0.8,
                color=colour, label=layer)
        spikes = [e["step"] for e in events if e["trial_id"] == worst["trial_id"] and e["kind"] == "grad_spike"
                  and e["layer"] == layer]
        for s in spikes:
            ax.axvline(s, color=colour, alpha=0.3, lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("gradient norm (spikes: vertical lines)")
    ax.set_title(f"most spiking run: base lr {worst['base_lr']:g}, batch {worst['batch_size']}, seed "
                 f"{worst['seed']}: {worst['spike_episodes']:.0f} episodes", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
